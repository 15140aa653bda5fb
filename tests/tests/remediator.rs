//! The remediator with real processes: an event center, a real agent reading a fixture kernel
//! log, and the remediator acting on a fake Kubernetes API server (`nodekeeper_tests::kubeapi`:
//! no real API server can run here). The agent's reboot command is a harmless script that gives
//! the fixture a new boot id; the test then restarts the agent as the node's boot would.

use std::path::Path;
use std::time::Duration;

use nodekeeper_tests::kubeapi::{self, cordoned_and_tainted};
use nodekeeper_tests::{
    Agent, AgentSpec, EventCenter, FixtureHost, LOGS_ONLY, Remediator, cli, json_lines, stored_events, wait_for,
};

/// Small clusters here: a breaker at the default 30% would trip on the first fault.
const CENTER: &str = r#"
[nodes]
check_interval = "100ms"
[permits]
breaker_fault_share = 1.0
[[permits.policy]]
operation = "isolate"
max_in_flight = 10
max_share = 1.0
"#;

const DEADLOCK: &str = "INFO: task dockerd:1234 blocked for more than 120 seconds.";
const TAINT: &str = "nodekeeper.io/fault";

/// The remediator, quick: it looks again every 200 ms, and waits at most a second for pods to
/// leave; `extra` TOML after that.
fn remediator(center: &str, kubeconfig: &Path, extra: &str) -> Remediator {
    let quick = "poll_interval = \"200ms\"\nstep_deadline = \"60s\"\nmigration_timeout = \"1s\"\n";
    Remediator::start(center, kubeconfig, &format!("{quick}{extra}"))
}

async fn fault_ids(center: &EventCenter, kind: &str) -> Vec<u64> {
    let (code, out, err) = cli(&center.url(), &["faults", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json_lines(&out)
        .into_iter()
        .filter(|f| f["type"] == kind)
        .filter_map(|f| f["id"].as_u64().or_else(|| f["id"].as_str()?.parse().ok()))
        .collect()
}

/// The remediation steps recorded on the fault, in order.
async fn steps(center: &EventCenter, fault: u64) -> Vec<String> {
    let got = nodekeeper_proto::v1::fleet_service_client::FleetServiceClient::new(center.channel().await)
        .get_fault(nodekeeper_proto::v1::GetFaultRequest { id: fault })
        .await
        .unwrap()
        .into_inner();
    got.events.iter().filter(|e| e.r#type == "RemediationStep").map(|e| e.attributes["step"].clone()).collect()
}

/// Runs the kernel-fault loop on node-r up to the release; `cordoned_before`: someone else
/// cordoned the node first.
async fn kernel_fault_loop(cordoned_before: bool) {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("node-r");
    api.kube.add_pod("shop", "web-1", "node-r", Some("ReplicaSet"));
    api.kube.add_pod("kube-system", "log-agent-x", "node-r", Some("DaemonSet"));
    if cordoned_before {
        api.kube.cordon("node-r");
    }
    let mut host = FixtureHost::new();
    let reboot = host.reboot_script("0f2b6a3c-1d4e-4f50-8a9b-000000000002");
    let config = format!("reboot_command = [\"/bin/sh\", \"{}\"]\n{}", reboot.display(), host.paths());
    let mut agent =
        Agent::start(AgentSpec { extra: &config, monitors: LOGS_ONLY, ..AgentSpec::new("node-r", &center.url()) })
            .await;
    agent.wait_connected().await;
    let _remediator = remediator(&center.url(), &api.kubeconfig, "");
    // Another controller writes the node between the remediator's read and its write, twice.
    api.kube.interfere(2);

    host.log(&[DEADLOCK]);
    wait_for("node-r isolated", Duration::from_secs(30), || async {
        (cordoned_and_tainted(&api.kube.node("node-r"), TAINT) == (true, true)).then_some(())
    })
    .await;
    let fault = fault_ids(&center, "KernelDeadlock").await[0];
    let node = api.kube.node("node-r");
    assert_eq!(node["metadata"]["annotations"]["nodekeeper.io/isolated-by"], "remediator-c1");
    assert_eq!(node["metadata"]["annotations"]["nodekeeper.io/fault-id"], fault.to_string());
    assert!(api.kube.conflicts() >= 1, "the interfering writer caused a 409 that was retried");
    wait_for("the app pod labelled", Duration::from_secs(30), || async {
        let pod = api.kube.pod("shop", "web-1")?;
        (pod["metadata"]["labels"]["nodekeeper.io/to-be-migrated"] == "true").then_some(())
    })
    .await;
    let ds = api.kube.pod("kube-system", "log-agent-x").unwrap();
    assert!(ds["metadata"]["labels"]["nodekeeper.io/to-be-migrated"].is_null(), "DaemonSet pods stay: {ds}");
    // The remediation's writes (the node conditions exporter's status writes are its own test's).
    let patches: Vec<String> =
        api.kube.requests().into_iter().filter(|r| r.starts_with("PATCH") && !r.contains("/status")).collect();
    assert!(patches.iter().all(|r| r.ends_with("application/merge-patch+json")), "{patches:?}");

    // The reboot: the agent runs its reboot command (our script: a new boot id), and the node
    // comes back as after a real reboot, its agent started again.
    wait_for("the reboot command", Duration::from_secs(60), || async {
        let results = stored_events(center.channel().await, "node-r", "CommandResult").await;
        results.iter().any(|e| e.attributes.get("success").is_some_and(|s| s == "true")).then_some(())
    })
    .await;
    assert_eq!(host.boot_id(), "0f2b6a3c-1d4e-4f50-8a9b-000000000002");
    // Still isolated while it is down.
    assert_eq!(cordoned_and_tainted(&api.kube.node("node-r"), TAINT), (true, true));
    agent.kill9();
    agent.spawn().await;

    // Back in a new boot, its kernel condition cleared: the gates hold and the node is released.
    wait_for("node-r released", Duration::from_secs(60), || async {
        (!cordoned_and_tainted(&api.kube.node("node-r"), TAINT).1).then_some(())
    })
    .await;
    let node = api.kube.node("node-r");
    assert_eq!(node["spec"]["unschedulable"] == true, cordoned_before, "uncordoned only if we cordoned it: {node}");
    assert!(node["metadata"]["annotations"]["nodekeeper.io/isolated-by"].is_null(), "{node}");
    // The release is recorded right after the node changed.
    let recorded = wait_for("the release recorded", Duration::from_secs(10), || async {
        let s = steps(&center, fault).await;
        (s.last().map(String::as_str) == Some("release")).then_some(s)
    })
    .await;
    assert_eq!(recorded, ["start", "isolate", "label-pods", "wait-migration", "reboot", "verify", "release"]);
    let (code, out, _) = cli(&center.url(), &["faults", "show", &fault.to_string()]).await;
    assert_eq!(code, 0);
    for step in ["isolate:", "label-pods:", "reboot:", "verify:", "release:"] {
        assert!(out.contains(step), "faults show lists {step}\n{out}");
    }
    // The isolate and reboot permits ended with the remediation, not with their leases.
    let permits = nodekeeper_proto::v1::permit_service_client::PermitServiceClient::new(center.channel().await)
        .list_permits(nodekeeper_proto::v1::ListPermitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .permits;
    assert!(permits.is_empty(), "{permits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_fault_is_isolated_migrated_rebooted_verified_and_released() {
    kernel_fault_loop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_someone_else_cordoned_is_never_uncordoned() {
    kernel_fault_loop(true).await;
}

/// Registers `nodes` in cluster c1 (a 60 s heartbeat interval: alive for the whole test).
async fn register(center: &EventCenter, nodes: &[String]) -> Vec<nodekeeper_tests::AgentConn> {
    let mut conns = Vec::new();
    for n in nodes {
        let mut h = nodekeeper_tests::hello("c1", n, "b1");
        h.heartbeat_interval = Some(nodekeeper_common::time::to_duration(Duration::from_secs(60)));
        conns.push(nodekeeper_tests::AgentConn::connect(&center.url(), h).await.unwrap());
    }
    conns
}

/// Opens (`holds`) or clears a condition `kind` on `node`, as another operator would report it.
async fn report(center: &EventCenter, id: &str, node: &str, kind: &str, holds: bool) {
    report_with(center, id, node, kind, holds, nodekeeper_proto::v1::RecommendedAction::Manual).await;
}

async fn report_with(
    center: &EventCenter,
    id: &str,
    node: &str,
    kind: &str,
    holds: bool,
    action: nodekeeper_proto::v1::RecommendedAction,
) {
    use nodekeeper_proto::v1::{ReportRequest, report_service_client::ReportServiceClient};
    let r = nodekeeper_tests::condition_report(id, "c1", node, kind, holds, action);
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest { producer: "test-operator".into(), reports: vec![r] })
        .await
        .unwrap();
}

/// A playbook for faults of type `kind` that heal when their condition clears.
fn heal_playbook(kind: &str) -> String {
    format!("[[playbook]]\ntypes = [\"{kind}\"]\nsteps = [\"isolate\", \"label-pods\", \"verify\", \"release\"]\n")
}

fn node_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("n{i:02}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_that_opens_while_its_node_is_in_hand_is_remediated_after() {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    let nodes = node_names(1);
    api.kube.add_node(&nodes[0]);
    let _conns = register(&center, &nodes).await;
    // Steps end within 5 s: a release that waits on an open condition gives up and escalates.
    let quick = "poll_interval = \"200ms\"\nstep_deadline = \"5s\"\nmigration_timeout = \"1s\"\n";
    let playbooks = format!("{quick}{}{}", heal_playbook("FirstFault"), heal_playbook("SecondFault"));
    let _remediator = Remediator::start(&center.url(), &api.kubeconfig, &playbooks);
    // The first fault's remediation holds the node: it waits at `verify` until the fault clears.
    report(&center, "first", "n00", "FirstFault", true).await;
    let first = wait_for("the first fault", Duration::from_secs(30), || async {
        fault_ids(&center, "FirstFault").await.first().copied()
    })
    .await;
    wait_for("the first fault's isolation", Duration::from_secs(30), || async {
        steps(&center, first).await.contains(&"isolate".to_owned()).then_some(())
    })
    .await;
    // A second fault on the node meanwhile: one remediation per node, so it waits its turn.
    report(&center, "second", "n00", "SecondFault", true).await;
    let second = wait_for("the second fault", Duration::from_secs(30), || async {
        fault_ids(&center, "SecondFault").await.first().copied()
    })
    .await;
    // The first clears; its release waits on the second's open condition, gives up and leaves
    // the node isolated for a person.
    report(&center, "first-cleared", "n00", "FirstFault", false).await;
    wait_for("the first fault escalated", Duration::from_secs(30), || async {
        steps(&center, first).await.contains(&"escalate".to_owned()).then_some(())
    })
    .await;
    // Then the second's turn comes, though nothing reported it again: its remediation starts,
    // finds the node held for a person (the first's isolation permit) and escalates too.
    let second_steps = wait_for("the second fault taken in hand", Duration::from_secs(30), || async {
        let s = steps(&center, second).await;
        s.contains(&"escalate".to_owned()).then_some(s)
    })
    .await;
    assert_eq!(second_steps.first().map(String::as_str), Some("start"), "{second_steps:?}");
    assert_eq!(cordoned_and_tainted(&api.kube.node("n00"), TAINT), (true, true), "still isolated, for a person");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_replayed_after_a_restart_trigger_nothing() {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    let nodes = node_names(2);
    for n in &nodes {
        api.kube.add_node(n);
    }
    let _conns = register(&center, &nodes).await;
    // A fault opened and cleared before this remediator ever ran.
    report(&center, "old-1", "n00", "DiskPressureStorm", true).await;
    report(&center, "old-2", "n00", "DiskPressureStorm", false).await;
    // It replays the whole log, then a fresh fault comes.
    let playbook = heal_playbook("DiskPressureStorm");
    let _remediator = remediator(&center.url(), &api.kubeconfig, &format!("start_from = \"oldest\"\n{playbook}"));
    report(&center, "new-1", "n01", "DiskPressureStorm", true).await;
    wait_for("the fresh fault isolated", Duration::from_secs(30), || async {
        (cordoned_and_tainted(&api.kube.node("n01"), TAINT) == (true, true)).then_some(())
    })
    .await;
    // The events before it were replayed first, and did nothing.
    assert_eq!(cordoned_and_tainted(&api.kube.node("n00"), TAINT), (false, false));
    assert!(stored_events(center.channel().await, "n00", "RemediationStep").await.is_empty());
    // No remediation write to n00 (its conditions on the Node's status are the exporter's: the
    // current state, not a replay).
    assert!(
        api.kube.requests().iter().all(|r| !r.contains("/nodes/n00") || r.starts_with("GET") || r.contains("/status"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_attempt_budget_the_node_stays_isolated_and_the_fault_is_escalated_with_an_alert() {
    let am = nodekeeper_tests::alertmanager::Alertmanager::start().await;
    let center =
        EventCenter::start(&format!("{CENTER}\n[alertmanager]\nurl = \"{}\"\nresend_interval = \"1s\"\n", am.url))
            .await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("n00");
    let _conns = register(&center, &node_names(1)).await;
    let config = format!("budget_attempts = 1\n{}", heal_playbook("FlakyNic"));
    let _remediator = remediator(&center.url(), &api.kubeconfig, &config);
    // The first fault is remediated: isolated, healed, released.
    report(&center, "f1-open", "n00", "FlakyNic", true).await;
    wait_for("the first isolation", Duration::from_secs(30), || async {
        (cordoned_and_tainted(&api.kube.node("n00"), TAINT) == (true, true)).then_some(())
    })
    .await;
    report(&center, "f1-clear", "n00", "FlakyNic", false).await;
    wait_for("the first release", Duration::from_secs(30), || async {
        (cordoned_and_tainted(&api.kube.node("n00"), TAINT) == (false, false)).then_some(())
    })
    .await;
    // The second within the window is past the budget of 1: isolated, escalated, alerted.
    report(&center, "f2-open", "n00", "FlakyNic", true).await;
    let second = wait_for("the second fault escalated", Duration::from_secs(30), || async {
        let (_, out, _) = cli(&center.url(), &["faults", "list", "-o", "json"]).await;
        json_lines(&out).into_iter().find(|f| f["state"] == "FAULT_STATE_ESCALATED" || f["state"] == "escalated")
    })
    .await;
    assert_eq!(cordoned_and_tainted(&api.kube.node("n00"), TAINT), (true, true), "stays isolated");
    let alert = wait_for("the escalation alert", Duration::from_secs(20), || async {
        am.active(&["alertname=\"NodekeeperFaultEscalated\"", "node=\"n00\""]).await.into_iter().next()
    })
    .await;
    assert_eq!(alert["labels"]["fault"], "FlakyNic");
    let id = second["id"].as_u64().or_else(|| second["id"].as_str()?.parse().ok()).unwrap();
    let (_, shown, _) = cli(&center.url(), &["faults", "show", &id.to_string()]).await;
    assert!(shown.contains("the budget of 1 is spent"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_storm_trips_the_breaker_isolates_no_more_than_allowed_and_releases_still_flow() {
    let am = nodekeeper_tests::alertmanager::Alertmanager::start().await;
    let config = format!(
        "[nodes]\ncheck_interval = \"100ms\"\n[permits]\nbreaker_fault_share = 0.3\n[[permits.policy]]\noperation = \"isolate\"\nmax_in_flight = 10\nmax_share = 0.1\n[alertmanager]\nurl = \"{}\"\nresend_interval = \"1s\"\n",
        am.url
    );
    let center = EventCenter::start(&config).await;
    let api = kubeapi::Server::start().await;
    let nodes = node_names(20);
    for n in &nodes {
        api.kube.add_node(n);
    }
    let _conns = register(&center, &nodes).await;
    let _remediator = remediator(&center.url(), &api.kubeconfig, &heal_playbook("StorageStorm"));
    let isolated =
        || nodes.iter().filter(|n| cordoned_and_tainted(&api.kube.node(n), TAINT).1).cloned().collect::<Vec<_>>();
    // Faults on 8 of 20 nodes (40%).
    for n in &nodes[..8] {
        report(&center, &format!("{n}-open"), n, "StorageStorm", true).await;
    }
    let tripped = ["alertname=\"NodekeeperBreakerTripped\"", "cluster=\"c1\""];
    wait_for("the breaker alert", Duration::from_secs(30), || async { am.active(&tripped).await.into_iter().next() })
        .await;
    // Never more isolated than 10% of the cluster, however long the remediator keeps asking.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        assert!(isolated().len() <= 2, "isolated {:?}", isolated());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Healed nodes are still released while the breaker holds.
    let held = isolated();
    for n in &held {
        report(&center, &format!("{n}-clear"), n, "StorageStorm", false).await;
    }
    wait_for("the healed nodes released", Duration::from_secs(30), || async {
        held.iter().all(|n| !cordoned_and_tainted(&api.kube.node(n), TAINT).1).then_some(())
    })
    .await;
    assert!(isolated().is_empty(), "the breaker holds every other isolation: {:?}", isolated());
    // A person resets the breaker: isolations resume, still within the share.
    let (code, _, err) = cli(&center.url(), &["breaker", "reset", "--cluster", "c1"]).await;
    assert_eq!(code, 0, "{err}");
    wait_for("isolations to resume", Duration::from_secs(30), || async { (!isolated().is_empty()).then_some(()) })
        .await;
    assert!(isolated().len() <= 2, "isolated {:?}", isolated());
    wait_for("the breaker alert resolved", Duration::from_secs(30), || async {
        am.active(&tripped).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_waits_out_a_disruption_budget_and_skips_daemonset_pods() {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("n00");
    api.kube.add_pod("shop", "db-0", "n00", Some("StatefulSet"));
    api.kube.add_pod("shop", "web-1", "n00", Some("ReplicaSet"));
    api.kube.add_pod("kube-system", "proxy-x", "n00", Some("DaemonSet"));
    api.kube.block_eviction("shop", "db-0", true);
    let _conns = register(&center, &node_names(1)).await;
    let config = "evict = true\n[[playbook]]\ntypes = [\"NicDown\"]\nsteps = [\"isolate\", \"label-pods\", \"evict\", \"escalate\"]\n";
    let _remediator = remediator(&center.url(), &api.kubeconfig, config);
    report(&center, "open", "n00", "NicDown", true).await;
    wait_for("web-1 evicted", Duration::from_secs(30), || async {
        api.kube.pod("shop", "web-1").is_none().then_some(())
    })
    .await;
    // The budget answers 429: db-0 stays, asked again.
    wait_for("db-0 asked again", Duration::from_secs(30), || async {
        let asked = api.kube.requests().iter().filter(|r| r.contains("/pods/db-0/eviction")).count();
        (asked >= 2).then_some(())
    })
    .await;
    assert!(api.kube.pod("shop", "db-0").is_some());
    api.kube.block_eviction("shop", "db-0", false);
    wait_for("db-0 evicted", Duration::from_secs(30), || async {
        api.kube.pod("shop", "db-0").is_none().then_some(())
    })
    .await;
    assert!(api.kube.pod("kube-system", "proxy-x").is_some(), "DaemonSet pods are not evicted");
    assert!(api.kube.requests().iter().all(|r| !r.contains("proxy-x/eviction")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hardware_fault_opens_a_repair_ticket_and_the_repaired_node_is_released() {
    use axum::routing::post;
    use std::sync::{Arc, Mutex};
    // The repair system: takes the request, answers a ticket.
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/tickets",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                r#"{"ticket": "HW-4711"}"#
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook = format!("http://{}/tickets", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("n00");
    let _conns = register(&center, &node_names(1)).await;
    let config = format!("hardware_repair_webhook = \"{webhook}\"\n");
    let _remediator = remediator(&center.url(), &api.kubeconfig, &config);
    let hw = nodekeeper_proto::v1::RecommendedAction::HardwareRepair;
    report_with(&center, "open", "n00", "MemoryUncorrectable", true, hw).await;
    let request =
        wait_for("the repair request", Duration::from_secs(30), || async { received.lock().unwrap().first().cloned() })
            .await;
    assert_eq!((request["request"].as_str(), request["node"].as_str()), (Some("hardware-repair"), Some("n00")));
    assert_eq!(request["fault"], "MemoryUncorrectable");
    assert_eq!(cordoned_and_tainted(&api.kube.node("n00"), TAINT), (true, true), "isolated while repaired");
    // Repaired: the condition clears, the node is verified and released.
    report_with(&center, "clear", "n00", "MemoryUncorrectable", false, hw).await;
    wait_for("n00 released", Duration::from_secs(30), || async {
        (cordoned_and_tainted(&api.kube.node("n00"), TAINT) == (false, false)).then_some(())
    })
    .await;
    let fault = fault_ids(&center, "MemoryUncorrectable").await[0];
    let (_, shown, _) = cli(&center.url(), &["faults", "show", &fault.to_string()]).await;
    assert!(shown.contains("ticket HW-4711"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_fault_is_first_healed_by_restarting_the_component_without_isolating_the_node() {
    use nodekeeper_proto::v1::command;
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("n00");
    let mut conns = register(&center, &node_names(1)).await;
    let _remediator = remediator(&center.url(), &api.kubeconfig, "");
    let restart = nodekeeper_proto::v1::RecommendedAction::RestartComponent;
    report_with(&center, "open", "n00", "KubeletUnhealthy", true, restart).await;
    // The node's agent receives the restart, with the permit the center granted.
    let cmd = tokio::time::timeout(Duration::from_secs(30), conns[0].next_command()).await.unwrap().unwrap();
    match cmd.action {
        Some(command::Action::RestartComponent(c)) => assert_eq!(c.component, "kubelet"),
        other => panic!("expected a kubelet restart, got {other:?}"),
    }
    assert!(!cmd.permit_id.is_empty());
    // The restart healed it: verified, and the node was never isolated.
    report_with(&center, "clear", "n00", "KubeletUnhealthy", false, restart).await;
    let fault = fault_ids(&center, "KubeletUnhealthy").await[0];
    wait_for("verified", Duration::from_secs(30), || async {
        (steps(&center, fault).await == ["start", "restart-component", "verify"]).then_some(())
    })
    .await;
    // No isolation: no write to the node but the exporter's conditions on its status.
    let writes = api.kube.requests();
    assert!(writes.iter().all(|r| !r.starts_with("PATCH") || r.contains("/status")), "{writes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_remediator_resumes_where_the_timeline_says_and_releases_its_permit() {
    use nodekeeper_proto::v1::{ListPermitsRequest, permit_service_client::PermitServiceClient};
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("n00");
    let _conns = register(&center, &node_names(1)).await;
    let playbook = heal_playbook("PsuFailing");
    let first = remediator(&center.url(), &api.kubeconfig, &playbook);
    report(&center, "open", "n00", "PsuFailing", true).await;
    let fault = wait_for("isolated and waiting to verify", Duration::from_secs(30), || async {
        let id = *fault_ids(&center, "PsuFailing").await.first()?;
        (steps(&center, id).await.last().map(String::as_str) == Some("label-pods")).then_some(id)
    })
    .await;
    drop(first);
    let _second = remediator(&center.url(), &api.kubeconfig, &playbook);
    report(&center, "clear", "n00", "PsuFailing", false).await;
    wait_for("the release", Duration::from_secs(30), || async {
        (steps(&center, fault).await.last().map(String::as_str) == Some("release")).then_some(())
    })
    .await;
    assert_eq!(
        steps(&center, fault).await,
        ["start", "isolate", "label-pods", "verify", "release"],
        "nothing done twice"
    );
    assert_eq!(cordoned_and_tainted(&api.kube.node("n00"), TAINT), (false, false));
    let permits = PermitServiceClient::new(center.channel().await)
        .list_permits(ListPermitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .permits;
    assert!(permits.is_empty(), "the isolate permit went with the isolation: {permits:?}");
}

/// Two replicas electing a leader through a Lease: 4 s lease, renewed every 500 ms.
const REPLICA: &str = "[leader_election]\nenabled = true\nnamespace = \"nodekeeper\"\nlease_duration = \"4s\"\n\
                       renew_deadline = \"3s\"\nretry_period = \"500ms\"\n";

fn lease_time(lease: &serde_json::Value, field: &str) -> std::time::SystemTime {
    let text = lease["spec"][field].as_str().unwrap_or_else(|| panic!("{field} in {lease}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{field} {text}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_leader_acts_and_the_other_takes_over_within_the_lease() {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    let nodes = node_names(1);
    api.kube.add_node(&nodes[0]);
    let _conns = register(&center, &nodes).await;
    let replica = |metrics: u16| {
        let quick = "poll_interval = \"200ms\"\nstep_deadline = \"60s\"\nmigration_timeout = \"1s\"\n";
        let extra = format!("{quick}metrics_listen = \"127.0.0.1:{metrics}\"\n{REPLICA}{}", heal_playbook("HaFault"));
        Remediator::start(&center.url(), &api.kubeconfig, &extra)
    };
    let scrape = |port: u16| format!("http://127.0.0.1:{port}/metrics");
    let gauge = |port: u16, name: &'static str| async move {
        let text = nodekeeper_tests::try_http_get(&scrape(port)).await.ok()?;
        nodekeeper_tests::metric(&text, name)
    };
    let (port_a, port_b) = (nodekeeper_tests::free_port(), nodekeeper_tests::free_port());
    let mut a = replica(port_a);
    wait_for("replica a leading", Duration::from_secs(20), || async {
        (gauge(port_a, "nodekeeper_remediator_leader").await == Some(1.0)).then_some(())
    })
    .await;
    let lease_name = "nodekeeper-remediator-c1";
    let holder_a = api.kube.lease("nodekeeper", lease_name).unwrap()["spec"]["holderIdentity"].clone();
    let _b = replica(port_b);
    wait_for("replica b following", Duration::from_secs(20), || async {
        (gauge(port_b, "nodekeeper_remediator_leader").await == Some(0.0)).then_some(())
    })
    .await;

    // A fault: the leader isolates the node and waits at `verify` (recorded when it passes); the
    // follower does nothing.
    report(&center, "ha", "n00", "HaFault", true).await;
    let fault = wait_for("the fault", Duration::from_secs(30), || async {
        fault_ids(&center, "HaFault").await.first().copied()
    })
    .await;
    wait_for("the leader's isolation", Duration::from_secs(30), || async {
        steps(&center, fault).await.contains(&"label-pods".to_owned()).then_some(())
    })
    .await;
    assert!(
        gauge(port_a, "nodekeeper_remediator_steps_total").await.unwrap_or(0.0) >= 2.0,
        "the leader's steps counted"
    );
    assert_eq!(gauge(port_b, "nodekeeper_remediator_steps_total").await.unwrap_or(0.0), 0.0, "the follower acted");

    // The leader dies mid-remediation: the follower takes the lease over within its duration
    // (plus the follower's retry period), and finishes the remediation without repeating a step.
    a.kill9();
    let last_renewal = lease_time(&api.kube.lease("nodekeeper", lease_name).unwrap(), "renewTime");
    let taken = wait_for("replica b leading", Duration::from_secs(20), || async {
        let lease = api.kube.lease("nodekeeper", lease_name)?;
        (lease["spec"]["holderIdentity"] != holder_a).then_some(lease)
    })
    .await;
    assert_eq!(taken["spec"]["leaseTransitions"], 1, "{taken}");
    let took = lease_time(&taken, "acquireTime").duration_since(last_renewal).unwrap();
    assert!(
        took <= Duration::from_secs(4) + Duration::from_millis(2 * 500),
        "taken over {took:?} after the last renewal"
    );
    wait_for("replica b acting", Duration::from_secs(20), || async {
        (gauge(port_b, "nodekeeper_remediator_leader").await == Some(1.0)).then_some(())
    })
    .await;
    report(&center, "ha-cleared", "n00", "HaFault", false).await;
    let done = wait_for("the release by the new leader", Duration::from_secs(30), || async {
        let s = steps(&center, fault).await;
        s.contains(&"release".to_owned()).then_some(s)
    })
    .await;
    for step in ["isolate", "label-pods", "release"] {
        assert_eq!(done.iter().filter(|s| *s == step).count(), 1, "{step} once: {done:?}");
    }
    assert_eq!(cordoned_and_tainted(&api.kube.node("n00"), TAINT), (false, false));
}
