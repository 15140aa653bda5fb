//! The storage syncer against a real tgt target with a cluster of 5,000 nodes (registered with a
//! hand-driven agent stream each, every one with its own initiator name). Measured: the first
//! full sync (an empty ACL filled with 5,000 initiator names), a drift pass (50 names unbound and
//! 50 foreign ones bound by hand, repaired by the periodic pass) and a pass with nothing to do,
//! and a node replacement (the node back with a new boot and a new initiator name) until the new
//! name is bound, 100 times. Side by side in the same run: tgt's own bulk tool, `tgt-admin
//! --execute`, binding the same 5,000 names from a targets.conf to a target of another tgtd.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench storage_acl
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::time::{Duration, Instant, SystemTime};

use nodekeeper_bench::{histogram, summary};
use nodekeeper_proto::v1::{
    EventFilter, Inventory, StartPosition, SubscribeRequest, event_service_client::EventServiceClient,
    subscribe_response,
};
use nodekeeper_tests::storage::{Syncer, Tgt, stdout_of};
use nodekeeper_tests::{AgentConn, EventCenter, hello, metric_where, try_http_get, wait_for};

/// `NODEKEEPER_BENCH_NODES` runs it smaller.
fn nodes() -> usize {
    std::env::var("NODEKEEPER_BENCH_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000)
}
const REPLACEMENTS: usize = 100;
const DRIFT: usize = 50;

fn iqn(i: usize, boot: usize) -> String {
    format!("iqn.2026-12.io.bench:n{i:05}-b{boot}")
}

/// Node `i` says hello in boot `boot` with its initiator name of that boot, and goes.
async fn register(url: &str, i: usize, boot: usize) {
    let mut h = hello("c1", &format!("n{i:05}"), &format!("00000000-0000-4000-8000-{boot:012x}"));
    h.inventory = Some(Inventory { iscsi_initiator_name: iqn(i, boot), ..Default::default() });
    drop(AgentConn::connect(url, h).await.expect("register"));
}

async fn gauge(syncer: &Syncer, name: &str) -> Option<f64> {
    let text = try_http_get(&syncer.metrics).await.ok()?;
    metric_where(&text, name, "target=\"vol\"")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let n = nodes();
    let center = EventCenter::start("").await;
    let url = center.url();
    let tgt = Tgt::start("127.0.0.1".parse().unwrap()).await;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let joins: Vec<_> = chunk
            .iter()
            .map(|&i| {
                tokio::spawn({
                    let url = url.clone();
                    async move { register(&url, i, 0).await }
                })
            })
            .collect();
        for j in joins {
            j.await.unwrap();
        }
    }
    println!("{n} nodes registered in {:.1} s", started.elapsed().as_secs_f64());

    // The first full sync: from an empty ACL to every node's name bound.
    let target = format!("[[target]]\nname = \"vol\"\nclients = \"initiators\"\n{}", tgt.backend_toml());
    let t0 = Instant::now();
    let syncer = Syncer::start(&url, "resync_interval = \"10s\"\n", &target);
    wait_for("the first full sync", Duration::from_secs(600), || async {
        (gauge(&syncer, "nodekeeper_storage_entries").await? == n as f64).then_some(())
    })
    .await;
    let first = t0.elapsed();
    let first_pass = gauge(&syncer, "nodekeeper_storage_pass_seconds").await.unwrap();
    assert_eq!(tgt.acl().len(), n);

    // The peer: tgt-admin binding the same names from a targets.conf, on a tgtd of its own
    // (`--execute` makes tgtd hold exactly what the file says: it would drop the syncer's target).
    let peer_tgt = Tgt::start("127.0.0.1".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("targets.conf");
    let lun = dir.path().join("lun2.img");
    std::fs::File::create(&lun).and_then(|f| f.set_len(4 << 20)).unwrap();
    let mut text = format!("<target iqn.2026-12.io.nodekeeper.bench:peer>\n    backing-store {}\n", lun.display());
    for i in 0..n {
        text.push_str(&format!("    initiator-name {}\n", iqn(i, 0)));
    }
    text.push_str("</target>\n");
    std::fs::write(&conf, text).unwrap();
    let t0 = Instant::now();
    let mut peer = std::process::Command::new("tgt-admin");
    peer.args(["-C", &peer_tgt.control_port.to_string(), "-c"]).arg(&conf).arg("--execute");
    stdout_of(peer);
    let peer_full = t0.elapsed();

    // A pass with nothing to do, then a drift pass: names unbound and foreign ones bound by hand.
    let passes = gauge(&syncer, "nodekeeper_storage_passes_total").await.unwrap();
    wait_for("an idle periodic pass", Duration::from_secs(30), || async {
        (gauge(&syncer, "nodekeeper_storage_passes_total").await? > passes).then_some(())
    })
    .await;
    let idle_pass = gauge(&syncer, "nodekeeper_storage_pass_seconds").await.unwrap();
    let passes = gauge(&syncer, "nodekeeper_storage_passes_total").await.unwrap();
    for i in 0..DRIFT {
        tgt.edit("unbind", &iqn(i * 7, 0));
        tgt.edit("bind", &format!("iqn.2026-12.io.bench:foreign{i}"));
    }
    let t0 = Instant::now();
    wait_for("the drift repaired", Duration::from_secs(60), || async {
        let acl = tgt.acl();
        (acl.len() == n && !acl.iter().any(|e| e.contains("foreign"))).then_some(())
    })
    .await;
    let drift_seen = t0.elapsed();
    // The pass that repaired it has ended (it records the changes after making them).
    wait_for("the repairing pass's end", Duration::from_secs(30), || async {
        (gauge(&syncer, "nodekeeper_storage_passes_total").await? > passes).then_some(())
    })
    .await;
    let drift_pass = gauge(&syncer, "nodekeeper_storage_pass_seconds").await.unwrap();

    // Replacements: each node back with a new boot and a new name, one after another.
    let mut events = EventServiceClient::new(center.channel().await)
        .subscribe(SubscribeRequest {
            start: StartPosition::Now as i32,
            filter: Some(EventFilter { types: vec!["StorageAclEntryAdded".into()], ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut h = histogram();
    for k in 0..REPLACEMENTS {
        let i = k * (n / REPLACEMENTS);
        let sent = SystemTime::now();
        register(&url, i, 1).await;
        let want = iqn(i, 1);
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), events.message())
                .await
                .expect("the new name bound within 30 s")
                .unwrap()
                .unwrap();
            if let Some(subscribe_response::Msg::Event(e)) = m.msg
                && e.attributes.get("entry") == Some(&want)
            {
                // Recorded just after tgtadm bound it.
                let at = e.time.as_ref().map(nodekeeper_common::time::timestamp_to_unix_ms).unwrap() as u64;
                let at = SystemTime::UNIX_EPOCH + Duration::from_millis(at);
                h.record(at.duration_since(sent).unwrap_or_default().as_micros() as u64).unwrap();
                break;
            }
        }
    }
    println!();
    println!("storage syncer, {n} nodes, tgt (tgtadm per entry)");
    println!(
        "  first full sync (start → {n} names bound): {:.2} s (the pass itself {first_pass:.2} s)",
        first.as_secs_f64()
    );
    println!("  peer, tgt-admin --execute of the same {n} names: {:.2} s", peer_full.as_secs_f64());
    println!("  periodic pass, nothing to do: {:.1} ms", idle_pass * 1000.0);
    println!(
        "  drift pass ({DRIFT} unbound + {DRIFT} foreign bound by hand): {:.1} ms (repaired {:.2} s after the edit, resync every 10 s)",
        drift_pass * 1000.0,
        drift_seen.as_secs_f64()
    );
    println!("  node replacement → new name bound ({REPLACEMENTS}): {}", summary(&h));
}
