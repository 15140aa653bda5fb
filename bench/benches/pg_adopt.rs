//! The replicas' watch for orphaned nodes on PostgreSQL: every replica asks every 2 s which nodes
//! nobody watches (their owner's lease ran out, or they never had one) and takes them over. At
//! 100,000 nodes over three live replicas, with 20 leases of replicas gone within the hour, this
//! times `PgStore::adopt_nodes` (the owners whose lease ran out first, then their nodes by the
//! owner index) side by side with the query it replaced (every node checked against the leases),
//! alternating, on the same database, in the steady state where nothing is to be taken.
//!
//! ```text
//! cargo bench -p nodekeeper-bench --bench pg_adopt          # --nodes N (default 100000), --rounds N (50)
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::time::{Duration, Instant};

use nodekeeper_bench::{histogram, summary};
use nodekeeper_eventcenter::store::NodeHello;
use nodekeeper_eventcenter::store::postgres::{PgOptions, PgStore};
use nodekeeper_tests::postgres::Postgres;

/// The query before: each live node's owner looked up in the leases.
const PREVIOUS: &str = "UPDATE nodes SET owner = $1, connections = 0
     WHERE decommissioned_ms IS NULL AND (owner IS NULL OR (owner <> $1 AND NOT EXISTS (
         SELECT 1 FROM leases l WHERE l.name = 'replica/' || nodes.owner AND l.expires_at > now())))
     RETURNING info, lost, liveness_changed_ms";

fn arg(name: &str, default: u64) -> u64 {
    std::env::args().skip_while(|a| a != name).nth(1).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hello(node: &str) -> NodeHello {
    NodeHello {
        cluster: "c1".into(),
        node: node.into(),
        boot_id: "b1".into(),
        agent_version: "0.1.0".into(),
        inventory: Default::default(),
        labels: Default::default(),
        heartbeat_interval: Duration::from_secs(10),
        status_port: 0,
        opens_stream: true,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (nodes, rounds) = (arg("--nodes", 100_000), arg("--rounds", 50));
    let pg = Postgres::start().await;
    let url = pg.create_database("bench").await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        let r = PgStore::open(&url, PgOptions::default()).await.expect("open");
        r.hello(hello(&format!("seed-{i}"))).await.expect("hello");
        replicas.push(r);
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    // Each replica's seed node copied to a third of the fleet, owner and all.
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO nodes SELECT (jsonb_populate_record(n, jsonb_build_object('name', 'n' || i))).*
             FROM nodes n, generate_series(1, $1::bigint) i WHERE n.name = 'seed-' || (i % 3)",
            &[&(nodes as i64)],
        )
        .await
        .expect("the fleet");
    client
        .batch_execute(
            "INSERT INTO leases SELECT 'replica/gone' || i, 'gone' || i, now() - interval '30 minutes', 1
             FROM generate_series(1, 20) i; ANALYZE",
        )
        .await
        .expect("leases of replicas gone");
    eprintln!("{nodes} nodes over 3 live replicas in {:.1} s", started.elapsed().as_secs_f64());
    let owner: String =
        client.query_one("SELECT owner FROM nodes WHERE name = 'seed-0'", &[]).await.expect("owner").get(0);

    let (mut now, mut before) = (histogram(), histogram());
    for _ in 0..rounds {
        let t = Instant::now();
        let taken = replicas[0].adopt_nodes().await.expect("adopt");
        now.record(t.elapsed().as_micros() as u64).ok();
        assert!(taken.is_empty(), "every node has a live owner");
        let t = Instant::now();
        let taken = client.query(PREVIOUS, &[&owner]).await.expect("the previous query");
        before.record(t.elapsed().as_micros() as u64).ok();
        assert!(taken.is_empty(), "every node has a live owner");
    }
    println!("| {nodes} nodes, nothing to take | one replica's pass |");
    println!("|---|---|");
    println!("| `adopt_nodes` (expired leases, then the owner index) | {} |", summary(&now));
    println!("| peer: the previous query (every node against the leases) | {} |", summary(&before));
}
