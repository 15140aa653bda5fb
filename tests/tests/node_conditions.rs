//! The center's conditions on the Kubernetes Node, as node-problem-detector writes them, by the
//! remediator's exporter: real event center, agent and remediator processes, and the fake
//! Kubernetes API server (`nodekeeper_tests::kubeapi`: no real one runs here), which takes node
//! status as the status subresource does (strategic merge, conditions merged by type) and records
//! each condition's field manager.

use std::collections::BTreeMap;
use std::time::Duration;

use nodekeeper_proto::v1::{
    Condition, ConditionStatus, GetNodeRequest, Observation, RecommendedAction, ReportRequest, Severity,
    fleet_service_client::FleetServiceClient, report_service_client::ReportServiceClient,
};
use nodekeeper_tests::{Agent, AgentSpec, EventCenter, LOGS_ONLY, Remediator, condition_report, kubeapi, wait_for};
use serde_json::{Value, json};

/// A remediator whose playbooks match nothing (only the exporter acts), heartbeats every 2 s.
const EXPORTER_ONLY: &str =
    "[[playbook]]\ntypes = [\"NoSuchFault\"]\nsteps = [\"escalate\"]\n[node_conditions]\nheartbeat_period = \"2s\"\n";

/// A KernelDeadlock change as the agent's monitors report one (the condition carries the
/// observation's reason and message).
fn kernel_deadlock(holds: bool) -> Observation {
    let status = if holds { ConditionStatus::True } else { ConditionStatus::False };
    let message = if holds { "task docker:7 blocked for more than 120 seconds" } else { "cleared" };
    Observation {
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "KernelDeadlock".into(),
        message: message.into(),
        severity: Severity::Error as i32,
        condition: Some(Condition {
            r#type: "KernelDeadlock".into(),
            status: status as i32,
            reason: if holds { "DockerHung" } else { "KernelHasNoDeadlock" }.into(),
            message: message.into(),
            last_transition_time: None,
        }),
        ..Default::default()
    }
}

/// The condition `kind` on the Node once `pred` holds for it.
async fn node_condition(api: &kubeapi::Server, kind: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(20), || async {
        api.kube.conditions("node-c").get(kind).filter(|c| pred(c)).cloned()
    })
    .await
}

/// The center's transition time of the node's condition `kind`, as Kubernetes writes times.
async fn center_transition(center: &EventCenter, kind: &str) -> String {
    let node = FleetServiceClient::new(center.channel().await)
        .get_node(GetNodeRequest { cluster: "c1".into(), node: "node-c".into() })
        .await
        .unwrap()
        .into_inner();
    let c = node.conditions.iter().filter_map(|c| c.condition.as_ref()).find(|c| c.r#type == kind).unwrap();
    nodekeeper_common::time::rfc3339(c.last_transition_time.as_ref().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_reach_the_node_as_node_problem_detector_writes_them() {
    let center = EventCenter::start("[nodes]\ncheck_interval = \"100ms\"\n").await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("node-c");
    let theirs = |kind: &str, reason: &str| {
        json!({ "type": kind, "status": "True", "reason": reason, "message": "theirs",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z" })
    };
    api.kube.set_condition("node-c", theirs("Ready", "KubeletReady"), "kubelet");
    api.kube.set_condition("node-c", theirs("GPUHealthy", "AllGood"), "gpu-operator");
    let others: BTreeMap<String, Value> =
        api.kube.conditions("node-c").into_iter().filter(|(k, _)| k == "Ready" || k == "GPUHealthy").collect();

    let mut agent = Agent::start(AgentSpec { monitors: LOGS_ONLY, ..AgentSpec::new("node-c", &center.url()) }).await;
    agent.wait_connected().await;
    let _remediator = Remediator::start(&center.url(), &api.kubeconfig, EXPORTER_ONLY);

    // A condition opens: on the Node within moments, with the center's transition time.
    agent.emit(vec![kernel_deadlock(true)]).await;
    let opened =
        node_condition(&api, "KernelDeadlock", "KernelDeadlock True on the Node", |c| c["status"] == "True").await;
    assert_eq!(opened["reason"], "DockerHung");
    assert_eq!(opened["message"], "task docker:7 blocked for more than 120 seconds");
    assert_eq!(opened["lastTransitionTime"], center_transition(&center, "KernelDeadlock").await);
    assert_eq!(api.kube.condition_manager("node-c", "KernelDeadlock").as_deref(), Some("nodekeeper"));

    // A heartbeat later: lastHeartbeatTime moves, the transition time does not.
    let beat = node_condition(&api, "KernelDeadlock", "a heartbeat write", |c| {
        c["lastHeartbeatTime"] != opened["lastHeartbeatTime"]
    })
    .await;
    assert_eq!(beat["lastTransitionTime"], opened["lastTransitionTime"]);
    assert_eq!(beat["status"], "True");

    // It clears: False, with a new transition time.
    agent.emit(vec![kernel_deadlock(false)]).await;
    let cleared = node_condition(&api, "KernelDeadlock", "KernelDeadlock False", |c| c["status"] == "False").await;
    assert_eq!(cleared["reason"], "KernelHasNoDeadlock");
    assert_eq!(cleared["lastTransitionTime"], center_transition(&center, "KernelDeadlock").await);
    assert_ne!(cleared["lastTransitionTime"], opened["lastTransitionTime"]);

    // A condition another producer (a RAID checker) reports.
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest {
            producer: "raid-checker".into(),
            reports: vec![condition_report("r1", "c1", "node-c", "RaidDegraded", true, RecommendedAction::None)],
        })
        .await
        .unwrap();
    node_condition(&api, "RaidDegraded", "RaidDegraded True", |c| c["status"] == "True").await;

    // The agent falls silent: its conditions turn Unknown; the checker's stays what it said.
    agent.kill9();
    let unknown = node_condition(&api, "KernelDeadlock", "KernelDeadlock Unknown", |c| c["status"] == "Unknown").await;
    assert_eq!(unknown["reason"], "NodekeeperAgentNotReporting");
    // Unknown since the agent's last heartbeat, or its last change when that came after (RFC 3339
    // in UTC: ordered as strings).
    let since = unknown["lastTransitionTime"].as_str().unwrap();
    let cleared_at = cleared["lastTransitionTime"].as_str().unwrap();
    let node = FleetServiceClient::new(center.channel().await)
        .get_node(GetNodeRequest { cluster: "c1".into(), node: "node-c".into() })
        .await
        .unwrap()
        .into_inner();
    let heartbeat = nodekeeper_common::time::rfc3339(node.last_heartbeat_time.as_ref().unwrap());
    assert_eq!(since, heartbeat.as_str().max(cleared_at), "{unknown}");
    assert_eq!(api.kube.conditions("node-c")["RaidDegraded"]["status"], "True");

    // Nothing of anyone else's was touched, and every write went through the status subresource
    // as a strategic merge patch of our conditions only.
    let now = api.kube.conditions("node-c");
    for (kind, theirs) in &others {
        assert_eq!(&now[kind], theirs, "{kind} changed");
    }
    assert_eq!(api.kube.condition_manager("node-c", "GPUHealthy").as_deref(), Some("gpu-operator"));
    let writes = api.kube.status_writes();
    assert!(writes.len() >= 4, "{writes:?}");
    for (node, conditions) in &writes {
        assert_eq!(node, "node-c");
        assert!(conditions.iter().all(|c| c["type"] != "Ready" && c["type"] != "GPUHealthy"), "{conditions:?}");
    }
    let status_requests: Vec<String> = api.kube.requests().into_iter().filter(|r| r.contains("/status")).collect();
    assert!(
        status_requests.iter().all(|r| r == "PATCH /api/v1/nodes/node-c/status application/strategic-merge-patch+json"),
        "{status_requests:?}"
    );
}

fn oom(message: &str) -> Observation {
    Observation {
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "OOMKilling".into(),
        message: message.into(),
        severity: Severity::Warning as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_problems_become_events_on_the_node_aggregated_and_rate_limited() {
    let center = EventCenter::start("[nodes]\ncheck_interval = \"100ms\"\n").await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("node-c");
    let agent = Agent::start(AgentSpec { monitors: LOGS_ONLY, ..AgentSpec::new("node-c", &center.url()) }).await;
    agent.wait_connected().await;
    let _remediator = Remediator::start(&center.url(), &api.kubeconfig, EXPORTER_ONLY);
    // The exporter is following once the node's first write is there.
    agent.emit(vec![kernel_deadlock(false)]).await;
    node_condition(&api, "KernelDeadlock", "the exporter following", |_| true).await;

    // The same problem three times: one Event, counted three times.
    for _ in 0..3 {
        agent.emit(vec![oom("Killed process 4242 (java)")]).await;
    }
    let event = wait_for("one Event counted 3 times", Duration::from_secs(20), || async {
        api.kube.events().into_iter().find(|e| e["count"] == 3)
    })
    .await;
    assert_eq!(api.kube.events().len(), 1, "{:?}", api.kube.events());
    assert_eq!(event["involvedObject"]["kind"], "Node");
    assert_eq!(event["involvedObject"]["name"], "node-c");
    assert_eq!(event["reason"], "OOMKilling");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["source"]["component"], "nodekeeper");
    assert_eq!(event["source"]["host"], "node-c");
    assert_eq!(event["metadata"]["namespace"], "default");

    // A flood of different ones: the node's budget (25 writes: 3 spent) lets 22 more through.
    agent.emit((0..40).map(|i| oom(&format!("Killed process {i} (worker)"))).collect()).await;
    // A condition change after the flood: once it is on the Node, the flood was handled (the
    // exporter takes the cluster's events in order).
    agent.emit(vec![kernel_deadlock(true)]).await;
    node_condition(&api, "KernelDeadlock", "the change after the flood", |c| c["status"] == "True").await;
    let on_c = api.kube.events().into_iter().filter(|e| e["involvedObject"]["name"] == "node-c").count();
    assert_eq!(on_c, 1 + 22, "one aggregated Event and 22 of the flood");
}
