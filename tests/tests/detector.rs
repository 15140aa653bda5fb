//! The detector with real processes and real networks: test hosts in network namespaces (veth
//! pairs on a bridge), each with a real agent; the event center and a detector in the root
//! namespace; links cut with `ip link set down` and shaped with `tc netem`. Needs root (CI runs
//! the tests as root).

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    ConditionStatus, Event, EventFilter, ListEventsRequest, event_service_client::EventServiceClient,
};
use nodekeeper_tests::netns::Net;
use nodekeeper_tests::{Agent, AgentSpec, EventCenter, bin, wait_for};

/// Fast settings for tests: heartbeats every second, suspicion acted on within a few seconds.
const CENTER: &str = "[nodes]\ncheck_interval = \"100ms\"\n";

struct Detector {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Detector {
    fn start(name: &str, center: &str, netns: Option<&str>, replica: usize, replicas: usize, extra: &str) -> Detector {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("detector.toml");
        // No kubelet on the test hosts unless the test starts one.
        let kubelet = if extra.contains("kubelet_port") { "" } else { "kubelet_port = 0\n" };
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\ncenter = \"{center}\"\ninsecure = true\nreplica = {replica}\nreplicas = {replicas}\n{kubelet}\
                 refresh_interval = \"500ms\"\nsweep_interval = \"3s\"\nsuspect_interval = \"500ms\"\n{extra}"
            ),
        )
        .unwrap();
        let program = bin("nodekeeper-detector");
        let mut cmd = match netns {
            Some(ns) => Net::command(ns, &program),
            None => std::process::Command::new(&program),
        };
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        Detector { child: cmd.spawn().expect("spawn nodekeeper-detector"), _dir: dir }
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network of `hosts` test hosts with agents, and a center reachable from them.
async fn setup(hosts: usize, center_config: &str) -> (Net, EventCenter, Vec<Agent>) {
    let net = Net::new(hosts);
    let mut center = EventCenter::new(center_config);
    center.listen_everywhere();
    center.spawn().await;
    let url = format!("http://{}:{}", net.hub_ip(), center.addr.port());
    let mut agents = Vec::new();
    for i in 0..hosts {
        let (ns, ip) = (net.host_ns(i), net.host_ip(i));
        let node = format!("host-{i}");
        agents.push(
            Agent::start(AgentSpec { heartbeat: "1s", netns: Some((&ns, ip)), ..AgentSpec::new(&node, &url) }).await,
        );
    }
    let ch = center.channel().await;
    wait_for("every agent connected", Duration::from_secs(30), || {
        let ch = ch.clone();
        async move {
            let nodes = nodekeeper_proto::v1::fleet_service_client::FleetServiceClient::new(ch)
                .list_nodes(nodekeeper_proto::v1::ListNodesRequest::default())
                .await
                .ok()?
                .into_inner()
                .nodes;
            (nodes.iter().filter(|n| n.connected).count() == hosts).then_some(())
        }
    })
    .await;
    (net, center, agents)
}

/// Every stored event of these types (any node).
async fn events(center: &EventCenter, types: &[&str]) -> Vec<Event> {
    let mut client = EventServiceClient::new(center.channel().await);
    let mut after = String::new();
    let mut out = Vec::new();
    loop {
        let r = client
            .list_events(ListEventsRequest {
                after_cursor: after,
                filter: Some(EventFilter {
                    types: types.iter().map(|t| t.to_string()).collect(),
                    ..Default::default()
                }),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(r.events);
        if r.next_cursor == r.head_cursor {
            return out;
        }
        after = r.next_cursor;
    }
}

/// The center's verdicts (the folded conditions), as (node, type, holds).
async fn verdicts(center: &EventCenter) -> Vec<(String, String, bool)> {
    events(center, &["AgentDown", "KubeletDown", "NodeUnreachable"])
        .await
        .into_iter()
        .filter_map(|e| Some((e.node.clone(), e.r#type.clone(), e.condition?.status() == ConditionStatus::True)))
        .collect()
}

async fn wait_verdict(center: &EventCenter, node: &str, kind: &str, holds: bool, within: Duration) -> Duration {
    let start = Instant::now();
    wait_for(&format!("{kind}={holds} for {node}"), within, || async {
        verdicts(center).await.into_iter().any(|(n, t, h)| n == node && t == kind && h == holds).then_some(())
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_node_is_unreachable_a_dead_agent_is_agent_down_and_both_recover() {
    let (net, center, mut agents) = setup(3, CENTER).await;
    let _detector = Detector::start("det-a", &center.url(), None, 0, 1, "");
    // The detector's first round reports every node healthy; give it that before cutting.
    wait_for("the first views", Duration::from_secs(20), || async {
        (events(&center, &["DetectorVote"]).await.len() >= 9).then_some(())
    })
    .await;

    net.cut_host(0, true);
    let cut_at = Instant::now();
    wait_verdict(&center, "host-0", "NodeUnreachable", true, Duration::from_secs(60)).await;
    let detected = cut_at.elapsed();
    assert!(detected < Duration::from_secs(20), "a cut node was declared unreachable after {detected:?}");
    net.cut_host(0, false);
    wait_verdict(&center, "host-0", "NodeUnreachable", false, Duration::from_secs(60)).await;

    agents[1].kill9();
    wait_verdict(&center, "host-1", "AgentDown", true, Duration::from_secs(60)).await;
    assert!(
        !verdicts(&center).await.iter().any(|(n, t, h)| n == "host-1" && t == "NodeUnreachable" && *h),
        "the node answers: its agent is down, the node is not unreachable"
    );
    agents[1].spawn().await;
    wait_verdict(&center, "host-1", "AgentDown", false, Duration::from_secs(60)).await;
    assert!(!verdicts(&center).await.iter().any(|(n, _, h)| n == "host-2" && *h), "host-2 was never declared faulty");
}

/// A stand-in kubelet in host `host`'s namespace: accepts on `port` and answers a `/healthz` GET
/// with 200 while `healthy` holds, 500 after.
fn kubelet(net: &Net, host: usize, port: u16, healthy: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = Net::listen_in(&net.host_ns(host), port);
    l.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    let status = if healthy.load(Ordering::SeqCst) { "200 OK" } else { "500 Internal Server Error" };
                    let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").as_bytes()).await;
                }
            });
        }
    })
}

/// The newest vote a detector cast on `node` for `verdict`.
async fn last_vote(center: &EventCenter, node: &str, verdict: &str) -> Event {
    let votes = events(center, &["DetectorVote"]).await;
    votes
        .into_iter()
        .rev()
        .find(|e| e.node == node && e.attributes.get("verdict").map(String::as_str) == Some(verdict))
        .unwrap_or_else(|| panic!("no {verdict} vote on {node}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_kubelet_is_kubelet_down_and_a_filtered_node_still_answers_the_echo() {
    let (net, center, agents) = setup(3, CENTER).await;
    let port = nodekeeper_tests::free_port();
    let healthy: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
    let mut kubelets: Vec<_> = (0..3).map(|i| kubelet(&net, i, port, healthy[i].clone())).collect();
    // The stand-in serves its healthz on the kubelet port itself.
    let extra = format!("kubelet_port = {port}\nkubelet_healthz_port = {port}\n");
    let _detector = Detector::start("det-a", &center.url(), None, 0, 1, &extra);
    wait_for("the first views", Duration::from_secs(20), || async {
        (events(&center, &["DetectorVote"]).await.len() >= 9).then_some(())
    })
    .await;

    // host-0's kubelet stops (its listener closes): KubeletDown, and nothing else.
    kubelets[0].abort();
    wait_verdict(&center, "host-0", "KubeletDown", true, Duration::from_secs(60)).await;
    assert!(
        !verdicts(&center).await.iter().any(|(n, t, h)| n == "host-0" && t != "KubeletDown" && *h),
        "the node and its agent answer"
    );
    kubelets[0] = kubelet(&net, 0, port, healthy[0].clone());
    wait_verdict(&center, "host-0", "KubeletDown", false, Duration::from_secs(60)).await;

    // host-2's kubelet still accepts connections but its /healthz fails: KubeletDown too, with
    // the healthz answer as evidence; healthy again, cleared.
    healthy[2].store(false, Ordering::SeqCst);
    wait_verdict(&center, "host-2", "KubeletDown", true, Duration::from_secs(60)).await;
    let vote = last_vote(&center, "host-2", "KubeletDown").await;
    assert!(vote.message.contains("kubelet healthz failed") && vote.message.contains("500"), "{}", vote.message);
    healthy[2].store(true, Ordering::SeqCst);
    wait_verdict(&center, "host-2", "KubeletDown", false, Duration::from_secs(60)).await;

    // host-1 drops TCP to its agent and kubelet ports; only the ICMP echo answers (the detector
    // runs as root here, so it may open a raw socket): the node is there, its agent is not
    // reachable — AgentDown, not NodeUnreachable.
    net.filter_tcp_ports(1, &[agents[1].status_port, port]);
    wait_verdict(&center, "host-1", "AgentDown", true, Duration::from_secs(60)).await;
    let vote = last_vote(&center, "host-1", "AgentDown").await;
    assert!(vote.message.contains("ICMP echo answered"), "{}", vote.message);
    assert!(
        !verdicts(&center).await.iter().any(|(n, t, h)| n == "host-1" && t == "NodeUnreachable" && *h),
        "the echo answers: the node is not unreachable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_cut_off_suspects_itself_and_declares_nothing() {
    let (net, center, _agents) = setup(3, CENTER).await;
    let _detector = Detector::start("det-a", &center.url(), None, 0, 1, "");
    wait_for("the first views", Duration::from_secs(20), || async {
        (events(&center, &["DetectorVote"]).await.len() >= 9).then_some(())
    })
    .await;
    net.cut_hub(true);
    wait_for("DetectorPartitioned", Duration::from_secs(60), || async {
        (!events(&center, &["DetectorPartitioned"]).await.is_empty()).then_some(())
    })
    .await;
    // Well past the confirmations, still nothing declared.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let v = verdicts(&center).await;
        assert!(!v.iter().any(|(_, _, h)| *h), "a partitioned detector declared a node faulty: {v:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    net.cut_hub(false);
    wait_for("DetectorRejoined", Duration::from_secs(60), || async {
        (!events(&center, &["DetectorRejoined"]).await.is_empty()).then_some(())
    })
    .await;
    assert!(!verdicts(&center).await.iter().any(|(_, _, h)| *h));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_quorum_of_two_one_replica_alone_declares_nothing() {
    // Six hosts: each replica's share of the sweep is big enough that one blackholed and one cut
    // host do not make it suspect itself.
    let (net, center, _agents) = setup(6, &format!("{CENTER}[detectors]\nquorum = 2\n")).await;
    let (ns, b_ip): (String, IpAddr) = net.add_extra();
    let url_from_ns = format!("http://{}:{}", net.hub_ip(), center.addr.port());
    let _a = Detector::start("det-a", &center.url(), None, 0, 2, "");
    let _b = Detector::start("det-b", &url_from_ns, Some(&ns), 1, 2, "");
    // det-b cannot reach host-1 (host-1 drops what it would send to det-b); det-a can. host-1 is
    // in det-b's share of the sweep (FNV-1a of its name, modulo 2), so det-b probes it.
    net.blackhole(1, b_ip);
    let vote = wait_for("det-b's vote that host-1 is unreachable", Duration::from_secs(60), || async {
        events(&center, &["DetectorVote"]).await.into_iter().find(|e| {
            e.node == "host-1"
                && e.origin.as_ref().is_some_and(|o| o.producer == "det-b")
                && e.attributes.get("verdict").map(String::as_str) == Some("NodeUnreachable")
                && e.attributes.get("holds").map(String::as_str) == Some("true")
        })
    })
    .await;
    assert!(vote.message.contains("det-b"), "{}", vote.message);
    // The vote was folded when it was stored: one of two is no verdict.
    assert!(!verdicts(&center).await.iter().any(|(_, _, h)| *h), "one replica alone declared a node faulty");
    // Both replicas agree when a node is really cut.
    net.cut_host(0, true);
    wait_verdict(&center, "host-0", "NodeUnreachable", true, Duration::from_secs(60)).await;
    let declared = verdicts(&center).await;
    assert!(!declared.iter().any(|(n, _, h)| n == "host-1" && *h), "{declared:?}");
}

/// 5% loss and 100 ms jitter on every link for `NODEKEEPER_SOAK_SECONDS` (default 300): no verdict.
/// Where the kernel has no netem (this project's CI kernel has none), the loss is made with
/// iptables' `statistic` match and there is no jitter; the test says so on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)]
async fn lossy_jittery_links_give_no_false_verdict() {
    let (net, center, _agents) = setup(3, CENTER).await;
    let _detector = Detector::start("det-a", &center.url(), None, 0, 1, "");
    wait_for("the first views", Duration::from_secs(20), || async {
        (events(&center, &["DetectorVote"]).await.len() >= 9).then_some(())
    })
    .await;
    if !net.netem_everywhere("delay 100ms 100ms loss 5%") {
        eprintln!("this kernel has no netem: 5% loss with iptables, NO jitter");
        net.iptables_loss_everywhere(0.05);
    }
    let secs: u64 = std::env::var("NODEKEEPER_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut checks = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let v = verdicts(&center).await;
        assert!(!v.iter().any(|(_, _, h)| *h), "a false verdict under loss and jitter: {v:?}");
        checks += 1;
    }
    // The detector kept probing all along (not a vacuous pass).
    let votes = events(&center, &["DetectorVote"]).await.len();
    assert!(checks >= (secs / 5) as usize - 1 && votes >= 9, "{checks} checks, {votes} votes");
}
