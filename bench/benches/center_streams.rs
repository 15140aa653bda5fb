//! The event center holding many concurrent agent streams, each heartbeating every 10 s like a
//! real agent at its default interval. Simulated agents run in this process, one HTTP/2
//! connection each (`--per-connection K`: K agent streams share one).
//!
//! `--replicas N`: N center replicas on one throwaway PostgreSQL 15 cluster, the agents spread
//! over them; CPU and memory per replica, and PostgreSQL's processes summed.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench center_streams [-- --streams 10000 --seconds 60]
//! cargo bench -p nodekeeper-bench --bench center_streams -- --streams 100000 --replicas 3 --per-connection 10
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_bench::{Sampler, channel, process_tree, processes_usage, simulated_agent_on};
use nodekeeper_tests::postgres::Postgres;
use nodekeeper_tests::{EventCenter, hello, wait_for};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mut streams, mut seconds, mut replicas, mut per_connection) = (10_000usize, 60u64, 0usize, 1usize);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{a} N"));
        match a.as_str() {
            "--streams" => streams = value(),
            "--seconds" => seconds = value() as u64,
            "--replicas" => replicas = value(),
            "--per-connection" => per_connection = value().max(1),
            _ => {}
        }
    }
    let connections = streams.div_ceil(per_connection);
    // Each connection is a socket on both sides; the centers inherit the limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    let want = hard.max((connections as u64 + 5_000) * 2);
    if nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want).is_err() {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    let (limit, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        limit as usize > connections + 1000,
        "the file descriptor limit ({limit}) is too low for {connections} connections"
    );

    let pg = if replicas > 0 { Some(Postgres::start().await) } else { None };
    let config = match &pg {
        Some(pg) => format!("[store]\npostgres_url = \"{}\"\n", pg.create_database("bench").await),
        None => String::new(),
    };
    let mut centers = Vec::new();
    for _ in 0..replicas.max(1) {
        centers.push(EventCenter::start(&config).await);
    }
    let mut samplers: Vec<Sampler> = centers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = if replicas > 0 {
                format!("replica {} of {replicas}", i + 1)
            } else {
                format!("nodekeeper-eventcenter, {streams} agent streams")
            };
            Sampler::new(&name, c.pid().expect("running"))
        })
        .collect();
    let connected = Arc::new(AtomicU64::new(0));
    let beats = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for g in 0..connections {
        let ch = channel(&centers[g % centers.len()].url()).await;
        for i in g * per_connection..((g + 1) * per_connection).min(streams) {
            let h = hello("bench", &format!("node-{i:06}"), "b1");
            tasks.spawn(simulated_agent_on(ch.clone(), h, Duration::from_secs(10), connected.clone(), beats.clone()));
        }
        // Connect in waves so the listen backlog is not overrun.
        if g % 250 == 249 {
            let want = ((g + 1) * per_connection).min(streams) as u64;
            let c = connected.clone();
            wait_for("a wave of agents to connect", Duration::from_secs(300), || {
                let c = c.clone();
                async move { (c.load(Ordering::Relaxed) >= want).then_some(()) }
            })
            .await;
        }
    }
    let c = connected.clone();
    wait_for("every agent to connect", Duration::from_secs(600), || {
        let c = c.clone();
        async move { (c.load(Ordering::Relaxed) >= streams as u64).then_some(()) }
    })
    .await;
    eprintln!(
        "{streams} streams on {connections} connections in {:.1} s; settling 15 s, measuring {seconds} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    for s in &mut samplers {
        s.begin();
    }
    let pg_tree = pg.as_ref().and_then(Postgres::pid).map(process_tree).unwrap_or_default();
    let pg_before = processes_usage(&pg_tree);
    let beats_before = beats.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut sample = tokio::time::interval(Duration::from_secs(5));
    while t0.elapsed() < Duration::from_secs(seconds) {
        sample.tick().await;
        for s in &mut samplers {
            s.sample();
        }
    }
    let window = t0.elapsed();
    let pg_after = processes_usage(&pg_tree);
    let nodes = nodekeeper_proto::v1::fleet_service_client::FleetServiceClient::new(centers[0].channel().await)
        .max_decoding_message_size(1 << 30)
        .list_nodes(nodekeeper_proto::v1::ListNodesRequest::default())
        .await
        .expect("list nodes")
        .into_inner()
        .nodes;
    let alive =
        nodes.iter().filter(|n| n.connected && n.liveness == nodekeeper_proto::v1::Liveness::Alive as i32).count();
    println!("| process | CPU (% of a core) | RSS avg | RSS max |");
    println!("|---|---|---|---|");
    for s in &samplers {
        println!("{}", s.row(window));
    }
    if pg.is_some() {
        println!(
            "| PostgreSQL 15 (postmaster and backends) | {:.1} % | | {} MiB at the end |",
            (pg_after.cpu - pg_before.cpu).as_secs_f64() / window.as_secs_f64() * 100.0,
            pg_after.rss_bytes >> 20
        );
    }
    println!(
        "\n{} heartbeats/s over {:.0} s; {alive} of {} nodes connected and alive at the end (as replica 1 reads them)",
        ((beats.load(Ordering::Relaxed) - beats_before) as f64 / window.as_secs_f64()).round(),
        window.as_secs_f64(),
        nodes.len()
    );
    tasks.abort_all();
}
