//! A rollout of 10,000 simulated nodes (hand-driven agent streams that heartbeat every 10 s and
//! answer each desired state with a converged component status; `nodekeeper_tests::simnode`)
//! in waves of one node then 1,000 nodes, all of a wave at once, with a 2 s bake. Measured: from
//! the end of each wave's bake to the last node of the next wave receiving its desired state,
//! and the center's CPU over the whole rollout. Side by side, in the same run and on the same
//! fleet: the center idle for as long, and the unsafe way, `components set` of the next version
//! to every node at once.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench rollout_waves
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::time::{Duration, Instant, SystemTime};

use nodekeeper_bench::{histogram, proc_usage, summary};
use nodekeeper_proto::v1::{
    ComponentSpec, CreateRolloutRequest, GetRolloutRequest, ListRolloutsRequest, RolloutNodePhase, RolloutPhase,
    RolloutSpec, RolloutStrategy, SetDesiredComponentsRequest, fleet_service_client::FleetServiceClient,
    rollout_service_client::RolloutServiceClient, set_desired_components_request::Target,
};
use nodekeeper_tests::simnode::Sim;
use nodekeeper_tests::{EventCenter, hello, wait_for};

/// `NODEKEEPER_BENCH_NODES` runs it smaller.
fn nodes() -> usize {
    std::env::var("NODEKEEPER_BENCH_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}
const WAVE: usize = 1_000;
const BAKE: Duration = Duration::from_secs(2);

fn kubelet(version: &str) -> ComponentSpec {
    ComponentSpec { name: "kubelet".into(), package: "kubelet".into(), version: version.into(), ..Default::default() }
}

/// CPU seconds of a process so far.
fn cpu(pid: u32) -> f64 {
    proc_usage(pid).map(|u| u.cpu.as_secs_f64()).unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let center = EventCenter::start("").await;
    let pid = center.pid().expect("the center runs");
    let sim = Sim::new(center.url(), Duration::from_secs(10));
    for i in 0..nodes() {
        let mut h = hello("c1", &format!("n{i:05}"), "b1");
        h.labels.insert("pool".into(), "general".into());
        tokio::spawn(sim.clone().run(h));
    }
    let ch = center.channel().await;
    wait_for("every node connected", Duration::from_secs(300), || async {
        (sim.connected.load(std::sync::atomic::Ordering::Relaxed) >= nodes()).then_some(())
    })
    .await;
    // Every node at 1.0 first.
    let mut fleet = FleetServiceClient::new(ch.clone());
    fleet
        .set_desired_components(SetDesiredComponentsRequest {
            cluster: "c1".into(),
            target: Some(Target::Selector("pool=general".into())),
            components: vec![kubelet("1.0-1")],
        })
        .await
        .expect("set 1.0");
    wait_for("every node given 1.0", Duration::from_secs(120), || async {
        (sim.seen.lock().unwrap().len() >= nodes()).then_some(())
    })
    .await;

    // The center idle with the fleet connected, as long as the rollout will take (measured after).
    let idle_from = (Instant::now(), cpu(pid));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let idle = (cpu(pid) - idle_from.1) / idle_from.0.elapsed().as_secs_f64();

    // The rollout: one node, then waves of 1,000, all of a wave at once.
    let mut waves = vec!["1".to_owned()];
    waves.extend((1..nodes() / WAVE).map(|w| (1 + w * WAVE).to_string()));
    waves.push("100%".into());
    let spec = RolloutSpec {
        name: "kubelet-2.0".into(),
        cluster: "c1".into(),
        selector: "pool=general".into(),
        components: vec![kubelet("2.0-1")],
        strategy: Some(RolloutStrategy {
            waves: waves.clone(),
            max_parallel: WAVE as u32,
            bake: Some(nodekeeper_common::time::to_duration(BAKE)),
            ..Default::default()
        }),
    };
    let mut rollouts = RolloutServiceClient::new(ch.clone()).max_decoding_message_size(256 << 20);
    let seen_before = sim.seen.lock().unwrap().len();
    let from = (Instant::now(), cpu(pid));
    rollouts.create_rollout(CreateRolloutRequest { spec: Some(spec) }).await.expect("create");
    // Polled once a second: the rollout's state is a few MB at this size.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut polls = 0;
    loop {
        tick.tick().await;
        polls += 1;
        let listed = rollouts.list_rollouts(ListRolloutsRequest::default()).await.expect("list").into_inner();
        let r = &listed.rollouts[0];
        if r.phase() == RolloutPhase::Completed {
            break;
        }
        assert!(
            from.0.elapsed() < Duration::from_secs(600),
            "not completed after 10 minutes: {:?} {}",
            r.phase(),
            r.reason
        );
        if polls % 10 == 0 {
            let of = |p: RolloutNodePhase| r.nodes.iter().filter(|n| n.phase() == p).count();
            eprintln!(
                "  {:?}, wave {}: {} changed, {} changing {}",
                r.phase(),
                r.wave + 1,
                of(RolloutNodePhase::Changed),
                of(RolloutNodePhase::Changing),
                r.reason
            );
        }
    }
    let took = from.0.elapsed();
    let rollout_cpu = (cpu(pid) - from.1) / took.as_secs_f64();

    // Bake end → the last node of the next wave given 2.0.
    let seen: Vec<(String, SystemTime, u64)> = sim.seen.lock().unwrap()[seen_before..]
        .iter()
        .filter(|(_, _, d)| d.components.iter().any(|c| c.version == "2.0-1"))
        .map(|(n, t, d)| (n.clone(), *t, d.generation))
        .collect();
    let done = rollouts.get_rollout(GetRolloutRequest { name: "kubelet-2.0".into() }).await.expect("get").into_inner();
    let rollout = done.rollout.expect("rollout");
    let wave_of: std::collections::HashMap<&str, u32> =
        rollout.nodes.iter().map(|n| (n.node.as_str(), n.wave)).collect();
    let mut latency = histogram();
    let mut worst = Duration::ZERO;
    for e in done.events.iter().filter(|e| e.r#type == "RolloutWaveChanged") {
        let msg = &e.message;
        let Some(w) = msg.strip_prefix("wave ").and_then(|m| m.split(' ').next()).and_then(|w| w.parse::<u32>().ok())
        else {
            continue;
        };
        if w as usize >= waves.len() {
            continue;
        }
        let baked = SystemTime::UNIX_EPOCH
            + Duration::from_millis(nodekeeper_common::time::timestamp_to_unix_ms(e.time.as_ref().unwrap()) as u64)
            + BAKE;
        // Wave w (counted from 1) baked; the next is index w. The first time each node saw 2.0.
        let mut firsts: std::collections::HashMap<&str, SystemTime> = Default::default();
        for (n, t, _) in &seen {
            if wave_of.get(n.as_str()) == Some(&w) {
                firsts.entry(n.as_str()).and_modify(|f| *f = (*f).min(*t)).or_insert(*t);
            }
        }
        let Some(last) = firsts.values().max() else { continue };
        let d = last.duration_since(baked).unwrap_or_default();
        worst = worst.max(d);
        latency.record(d.as_micros() as u64).unwrap();
    }

    // The unsafe way: 3.0 to every node at once.
    let seen_before = sim.seen.lock().unwrap().len();
    let once_from = (Instant::now(), cpu(pid));
    fleet
        .set_desired_components(SetDesiredComponentsRequest {
            cluster: "c1".into(),
            target: Some(Target::Selector("pool=general".into())),
            components: vec![kubelet("3.0-1")],
        })
        .await
        .expect("set 3.0");
    wait_for("every node given 3.0", Duration::from_secs(120), || async {
        (sim.seen.lock().unwrap().len() >= seen_before + nodes()).then_some(())
    })
    .await;
    let once_took = once_from.0.elapsed();
    let once_cpu_s = cpu(pid) - once_from.1;

    println!("rollout of {} simulated nodes, waves {} (max_parallel {WAVE}), bake {BAKE:?}", nodes(), waves.join(", "));
    println!("  bake end -> last node of the next wave commanded: worst {worst:?}; {}", summary(&latency));
    println!(
        "  whole rollout: {:.1} s, center CPU {:.3} cores (the same fleet idle: {:.3} cores)",
        took.as_secs_f64(),
        rollout_cpu,
        idle
    );
    println!(
        "  peer, `components set` to all {} at once: every node commanded in {:.2} s, {:.2} CPU seconds",
        nodes(),
        once_took.as_secs_f64(),
        once_cpu_s
    );
}
