//! Fault → cordon request: the time from a fault's event being stored in the event center to the
//! remediator's cordon request reaching the Kubernetes API server, with 1,000 nodes and 100
//! faults opened at once (three rounds on fresh nodes). The nodes are simulated agents
//! heartbeating every 10 s; the API server is the tests' fake (`nodekeeper_tests::kubeapi`),
//! which notes when each node's first PATCH arrives.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench remediator_cordon
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_bench::{histogram, simulated_agent, summary};
use nodekeeper_proto::v1::{
    ListConsumersRequest, RecommendedAction, ReportRequest, event_service_client::EventServiceClient,
    report_service_client::ReportServiceClient,
};
use nodekeeper_tests::{EventCenter, Remediator, condition_report, hello, kubeapi, wait_for};

const NODES: usize = 1000;
const FAULTS: usize = 100;
const ROUNDS: usize = 3;

const CENTER: &str = r#"
[permits]
breaker_fault_share = 1.0
[[permits.policy]]
operation = "isolate"
max_in_flight = 1000
max_share = 1.0
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i:04}")).collect();
    for n in &names {
        api.kube.add_node(n);
    }
    let (connected, beats) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for n in &names {
        tokio::spawn(simulated_agent(
            center.url(),
            hello("c1", n, "b1"),
            Duration::from_secs(10),
            connected.clone(),
            beats.clone(),
        ));
    }
    wait_for("every node connected", Duration::from_secs(120), || async {
        (connected.load(Ordering::Relaxed) as usize == NODES).then_some(())
    })
    .await;

    let _remediator = Remediator::start(&center.url(), &api.kubeconfig, "");
    let ch = center.channel().await;
    wait_for("the remediator subscribed", Duration::from_secs(30), || async {
        let c = EventServiceClient::new(ch.clone()).list_consumers(ListConsumersRequest {}).await.ok()?;
        c.into_inner().consumers.iter().any(|c| c.name == "remediator-c1").then_some(())
    })
    .await;

    let mut h = histogram();
    for round in 0..ROUNDS {
        let batch: Vec<String> = names[round * FAULTS..(round + 1) * FAULTS].to_vec();
        // 100 faults at once, each from its own producer call; stored when the call returns.
        let mut calls = tokio::task::JoinSet::new();
        for n in batch.clone() {
            let ch = ch.clone();
            calls.spawn(async move {
                ReportServiceClient::new(ch)
                    .report(ReportRequest {
                        producer: "bench".into(),
                        reports: vec![condition_report(
                            &format!("{n}-open"),
                            "c1",
                            &n,
                            "StorageUnreachable",
                            true,
                            RecommendedAction::Manual,
                        )],
                    })
                    .await
                    .unwrap();
                (n, Instant::now())
            });
        }
        let stored: Vec<(String, Instant)> = calls.join_all().await;
        wait_for("every cordon request", Duration::from_secs(120), || async {
            batch.iter().all(|n| api.kube.first_patch(n).is_some()).then_some(())
        })
        .await;
        for (n, at) in stored {
            let patched = api.kube.first_patch(&n).unwrap();
            h.record(patched.saturating_duration_since(at).as_micros() as u64).unwrap();
        }
        eprintln!("round {round}: {}", summary(&h));
    }
    println!("| nodes | faults at once | fault stored → cordon request |");
    println!("|---|---|---|");
    println!("| {NODES} | {FAULTS} (× {ROUNDS} rounds) | {} |", summary(&h));
}
