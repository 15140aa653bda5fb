//! The event center holding many concurrent agent streams, each heartbeating every 10 s like a
//! real agent at its default interval. Simulated agents run in this process, one HTTP/2
//! connection each.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench center_streams [-- --streams 10000 --seconds 60]
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_bench::{Sampler, simulated_agent};
use nodekeeper_tests::{EventCenter, hello, wait_for};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mut streams, mut seconds) = (10_000usize, 60u64);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--streams" => streams = it.next().and_then(|v| v.parse().ok()).expect("--streams N"),
            "--seconds" => seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            _ => {}
        }
    }
    // Each stream is a socket on both sides.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    assert!(hard as usize > streams + 1000, "the file descriptor limit ({hard}) is too low for {streams} streams");

    let center = EventCenter::start("").await;
    let mut sampler = Sampler::new(&format!("nodekeeper-eventcenter, {streams} agent streams"), center.pid().unwrap());
    let connected = Arc::new(AtomicU64::new(0));
    let beats = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..streams {
        let h = hello("bench", &format!("node-{i:05}"), "b1");
        tasks.spawn(simulated_agent(center.url(), h, Duration::from_secs(10), connected.clone(), beats.clone()));
        // Connect in waves so the listen backlog is not overrun.
        if i % 250 == 249 {
            let want = (i + 1) as u64;
            let c = connected.clone();
            wait_for("a wave of agents to connect", Duration::from_secs(120), || {
                let c = c.clone();
                async move { (c.load(Ordering::Relaxed) >= want).then_some(()) }
            })
            .await;
        }
    }
    let c = connected.clone();
    wait_for("every agent to connect", Duration::from_secs(300), || {
        let c = c.clone();
        async move { (c.load(Ordering::Relaxed) >= streams as u64).then_some(()) }
    })
    .await;
    eprintln!(
        "{streams} streams connected in {:.1} s; settling 15 s, measuring {seconds} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    sampler.begin();
    let beats_before = beats.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut sample = tokio::time::interval(Duration::from_secs(5));
    while t0.elapsed() < Duration::from_secs(seconds) {
        sample.tick().await;
        sampler.sample();
    }
    let window = t0.elapsed();
    let nodes = nodekeeper_proto::v1::fleet_service_client::FleetServiceClient::new(center.channel().await)
        .list_nodes(nodekeeper_proto::v1::ListNodesRequest::default())
        .await
        .expect("list nodes")
        .into_inner()
        .nodes;
    let alive =
        nodes.iter().filter(|n| n.connected && n.liveness == nodekeeper_proto::v1::Liveness::Alive as i32).count();
    println!("| process | CPU (% of a core) | RSS avg | RSS max |");
    println!("|---|---|---|---|");
    println!("{}", sampler.row(window));
    println!(
        "\n{} heartbeats/s over {:.0} s; {alive} of {} nodes connected and alive at the end",
        ((beats.load(Ordering::Relaxed) - beats_before) as f64 / window.as_secs_f64()).round(),
        window.as_secs_f64(),
        nodes.len()
    );
    tasks.abort_all();
}
