//! Node conditions on the Kubernetes Nodes at scale: 5,000 nodes (simulated agents heartbeating
//! every 10 s) with 10 conditions each, written by the remediator's exporter (release build) to
//! the tests' fake API server (`nodekeeper_tests::kubeapi`), with a 10 s heartbeat period so that
//! three periods fit in the window, and its Kubernetes node sync (labels, onboarding, deletions)
//! listing the Nodes every 10 s. Measured: status requests per node per heartbeat period in
//! steady state, node list requests per sync pass, and the time from a condition change stored in
//! the center to its status write arriving at the API server.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench node_conditions
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_bench::{histogram, simulated_agent, summary};
use nodekeeper_proto::v1::{RecommendedAction, ReportRequest, report_service_client::ReportServiceClient};
use nodekeeper_tests::{EventCenter, Remediator, condition_report, hello, kubeapi, wait_for};

const NODES: usize = 5000;
const TYPES: usize = 10;
const PERIOD: Duration = Duration::from_secs(10);
const PERIODS: u32 = 3;
const CHANGES: usize = 200;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let center = EventCenter::start("").await;
    let api = kubeapi::Server::start().await;
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i:05}")).collect();
    for n in &names {
        api.kube.add_node(n);
    }
    let (connected, beats) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for (i, n) in names.iter().enumerate() {
        tokio::spawn(simulated_agent(center.url(), hello("c1", n, "b1"), PERIOD, connected.clone(), beats.clone()));
        if i % 250 == 249 {
            let want = (i + 1) as u64;
            wait_for("a wave of agents", Duration::from_secs(120), || async {
                (connected.load(Ordering::Relaxed) >= want).then_some(())
            })
            .await;
        }
    }
    // Ten conditions per node, all False (a checker's reports), in batches of 1,000.
    let ch = center.channel().await;
    let all: Vec<_> = names
        .iter()
        .flat_map(|n| {
            (0..TYPES).map(move |t| {
                condition_report(
                    &format!("{n}-{t}"),
                    "c1",
                    n,
                    &format!("BenchCondition{t}"),
                    false,
                    RecommendedAction::None,
                )
            })
        })
        .collect();
    for batch in all.chunks(1000) {
        ReportServiceClient::new(ch.clone())
            .report(ReportRequest { producer: "bench-checker".into(), reports: batch.to_vec() })
            .await
            .expect("report");
    }

    let started = Instant::now();
    let _remediator = Remediator::start(
        &center.url(),
        &api.kubeconfig,
        "[[playbook]]\ntypes = [\"NoSuchFault\"]\nsteps = [\"escalate\"]\n[node_conditions]\nheartbeat_period = \"10s\"\n\
         [kubernetes_nodes]\nsync_period = \"10s\"\n",
    );
    wait_for("every node's conditions written", Duration::from_secs(300), || async {
        (api.kube.status_write_count() >= NODES).then_some(())
    })
    .await;
    let synced = started.elapsed();
    eprintln!("initial sync: {NODES} nodes in {synced:?}");

    // Steady state: nothing changes for three heartbeat periods (and three sync passes).
    let lists = || api.kube.requests().iter().filter(|r| r.starts_with("GET /api/v1/nodes ")).count();
    let (before, lists_before) = (api.kube.status_write_count(), lists());
    tokio::time::sleep(PERIOD * PERIODS).await;
    let steady = api.kube.status_write_count() - before;
    let list_pages = (lists() - lists_before) as f64 / PERIODS as f64;
    let per_node_period = steady as f64 / (NODES as f64 * PERIODS as f64);

    // Changes: one condition of one node at a time, from the report's return to the status
    // write that carries it.
    let mut h = histogram();
    for k in 0..CHANGES {
        // Distinct nodes: each write found is this change's.
        let node = &names[(k * 24) % NODES];
        let report =
            condition_report(&format!("{node}-flip"), "c1", node, "BenchCondition0", true, RecommendedAction::None);
        ReportServiceClient::new(ch.clone())
            .report(ReportRequest { producer: "bench-checker".into(), reports: vec![report] })
            .await
            .expect("report");
        let stored = Instant::now();
        let written = wait_for("the change on the Node", Duration::from_secs(30), || async {
            api.kube.status_write_time(node, "BenchCondition0", "True")
        })
        .await;
        h.record(written.saturating_duration_since(stored).as_micros() as u64).expect("record");
    }
    println!(
        "| nodes × conditions | initial sync | status requests per node per heartbeat period (steady, {PERIODS} periods) | node list requests per sync pass | change stored → status write |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {NODES} × {TYPES} | {:.1} s | {per_node_period:.2} | {list_pages:.1} | {} |",
        synced.as_secs_f64(),
        summary(&h)
    );
}
