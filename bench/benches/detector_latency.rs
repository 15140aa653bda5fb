//! Detection latency of a cut node with the detector's default settings (sweep 30 s, suspects
//! every 1 s, 3 confirmations, heartbeat suspicion phi 8) and the agents' default heartbeat
//! (10 s): test hosts in network namespaces, each link cut in turn; the time from the cut to the
//! center's `NodeUnreachable` verdict. Kubernetes' own node grace is 40–50 s. Needs root.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench detector_latency [-- --cuts 5]
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodekeeper_bench::{KillOnDrop, target_dir};
use nodekeeper_proto::v1::{ConditionStatus, EventFilter, ListEventsRequest, event_service_client::EventServiceClient};
use nodekeeper_tests::netns::Net;
use nodekeeper_tests::{Agent, AgentSpec, EventCenter, wait_for};

async fn verdict(center: &EventCenter, node: &str, holds: bool) -> bool {
    let Ok(r) = EventServiceClient::new(center.channel().await)
        .list_events(ListEventsRequest {
            filter: Some(EventFilter {
                nodes: vec![node.into()],
                types: vec!["NodeUnreachable".into()],
                ..Default::default()
            }),
            limit: 10_000,
            ..Default::default()
        })
        .await
    else {
        return false;
    };
    r.into_inner()
        .events
        .last()
        .and_then(|e| e.condition.as_ref())
        .is_some_and(|c| (c.status() == ConditionStatus::True) == holds)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut cuts = 5usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--cuts" {
            cuts = it.next().and_then(|v| v.parse().ok()).expect("--cuts N");
        }
    }
    let hosts = 4;
    let net = Net::new(hosts);
    let mut center = EventCenter::new("");
    center.listen_everywhere();
    center.spawn().await;
    let url = format!("http://{}:{}", net.hub_ip(), center.addr.port());
    let mut agents = Vec::new();
    for i in 0..hosts {
        let (ns, ip) = (net.host_ns(i), net.host_ip(i));
        let node = format!("host-{i}");
        // The agents' default heartbeat.
        agents.push(
            Agent::start(AgentSpec { heartbeat: "10s", netns: Some((&ns, ip)), ..AgentSpec::new(&node, &url) }).await,
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("detector.toml");
    // Default settings; no kubelet runs on the test hosts.
    std::fs::write(
        &config,
        format!("name = \"bench\"\ncenter = \"{}\"\ninsecure = true\nkubelet_port = 0\n", center.url()),
    )
    .unwrap();
    let detector = Command::new(target_dir().join("release/nodekeeper-detector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the detector (cargo build --release --workspace --bins)");
    let detector = KillOnDrop(detector);
    eprintln!("warming up 45 s: heartbeat history and the first sweep");
    tokio::time::sleep(Duration::from_secs(45)).await;
    let mut samples = Vec::new();
    for k in 0..cuts {
        let i = k % hosts;
        let node = format!("host-{i}");
        // Cut at a random point of the heartbeat period.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 10_000)).await;
        net.cut_host(i, true);
        let cut = Instant::now();
        wait_for("the verdict", Duration::from_secs(120), || async {
            verdict(&center, &node, true).await.then_some(())
        })
        .await;
        let took = cut.elapsed();
        eprintln!("{node}: NodeUnreachable after {:.1} s", took.as_secs_f64());
        samples.push(took);
        net.cut_host(i, false);
        wait_for("the recovery", Duration::from_secs(120), || async {
            verdict(&center, &node, false).await.then_some(())
        })
        .await;
    }
    drop(detector);
    drop(agents);
    let max = samples.iter().max().copied().unwrap_or_default();
    let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
    println!("| cuts | mean | max | samples |");
    println!("|---|---|---|---|");
    println!(
        "| {cuts} | {:.1} s | **{:.1} s** | {} |",
        mean.as_secs_f64(),
        max.as_secs_f64(),
        samples.iter().map(|d| format!("{:.1}", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
    );
    assert!(max <= Duration::from_secs(20), "a cut node took {max:?} to be declared unreachable");
}
