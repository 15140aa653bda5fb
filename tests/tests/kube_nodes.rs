//! The cluster's Kubernetes Nodes and the center kept in step by the remediator: onboarding
//! behind the startup taint until every readiness gate holds, labels synced for component
//! selectors, Nodes deleted from Kubernetes decommissioned (and `nodekeeper nodes delete` for
//! the others). Real event center, remediator and CLI processes; hand-driven agent streams; the
//! fake Kubernetes API server (`nodekeeper_tests::kubeapi`: no real one runs here).

use std::time::Duration;

use nodekeeper_proto::v1::{
    ComponentPhase, ComponentSpec, ComponentStatus, ComponentStatusReport, DesiredState, EventFilter, FaultState,
    GetNodeRequest, ListFaultsRequest, ListNodesRequest, Node, RecommendedAction, ReportRequest,
    SetDesiredComponentsRequest, StartPosition, SubscribeRequest, agent_message,
    event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
    report_service_client::ReportServiceClient, set_desired_components_request::Target, subscribe_response,
};
use nodekeeper_tests::{
    AgentConn, EventCenter, Remediator, cli, condition_report, free_port, hello, http_get, json_lines, kubeapi,
    metric_where, stored_events, wait_for,
};
use serde_json::json;

const STARTUP_TAINT: &str = "nodekeeper.io/not-ready";

/// A center whose nodes beat rarely (the hand-driven streams send no heartbeats), with `extra`
/// (top-level keys and tables) first.
async fn center(extra: &str) -> EventCenter {
    EventCenter::start(&format!("{extra}\n[nodes]\ndefault_heartbeat_interval = \"60s\"\ncheck_interval = \"100ms\"\n"))
        .await
}

/// A remediator that only syncs nodes (its playbooks match nothing), every second.
fn remediator(center: &EventCenter, api: &kubeapi::Server, extra: &str) -> Remediator {
    Remediator::start(
        &center.url(),
        &api.kubeconfig,
        &format!(
            "{extra}\n[[playbook]]\ntypes = [\"NoSuchFault\"]\nsteps = [\"escalate\"]\n\
             [kubernetes_nodes]\nsync_period = \"1s\"\nonboarding_check = \"200ms\"\nmax_decommissions_per_pass = 1\n"
        ),
    )
}

async fn node(center: &EventCenter, name: &str) -> Option<Node> {
    FleetServiceClient::new(center.channel().await)
        .get_node(GetNodeRequest { cluster: "c1".into(), node: name.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn startup_tainted(api: &kubeapi::Server, name: &str) -> bool {
    kubeapi::cordoned_and_tainted(&api.kube.node(name), STARTUP_TAINT).1
}

/// The operator's condition LogCollectorReady on `node`.
async fn log_collector_ready(center: &EventCenter, id: &str, node: &str, ready: bool) {
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest {
            producer: "log-operator".into(),
            reports: vec![condition_report(id, "c1", node, "LogCollectorReady", ready, RecommendedAction::None)],
        })
        .await
        .unwrap();
}

/// Full node lists the remediator has made so far.
fn node_lists(api: &kubeapi::Server) -> usize {
    api.kube.requests().iter().filter(|r| r.starts_with("GET /api/v1/nodes ")).count()
}

/// Waits until the remediator has listed the Nodes twice more (a whole pass after this call).
async fn two_passes(api: &kubeapi::Server) {
    let before = node_lists(api);
    wait_for("two more node lists", Duration::from_secs(20), || async {
        (node_lists(api) >= before + 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_takes_pods_only_when_every_gate_holds() {
    let center = center("[[readiness_gates]]\nselector = \"pool=gpu\"\nconditions = [\"LogCollectorReady\"]\n").await;
    let api = kubeapi::Server::start().await;
    // The kubelet registers the Node with the startup taint and its pool label; the node's agent
    // knows nothing of the pool.
    api.kube.register_node("n-new", json!({ "pool": "gpu", "kubernetes.io/hostname": "n-new" }), &[STARTUP_TAINT]);
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n-new", "b1")).await.unwrap();
    // Components desired of the gpu pool: the node gets them once its Kubernetes labels are synced.
    let kubelet = ComponentSpec {
        name: "kubelet".into(),
        package: "kubelet".into(),
        version: "1.31.0-1".into(),
        ..Default::default()
    };
    let generation = FleetServiceClient::new(center.channel().await)
        .set_desired_components(SetDesiredComponentsRequest {
            cluster: "c1".into(),
            target: Some(Target::Selector("pool=gpu".into())),
            components: vec![kubelet.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .generation;
    let metrics = free_port();
    let _remediator = remediator(&center, &api, &format!("metrics_listen = \"127.0.0.1:{metrics}\""));

    let desired: DesiredState =
        tokio::time::timeout(Duration::from_secs(20), agent.next_desired()).await.expect("desired state").unwrap();
    assert_eq!((desired.generation, desired.components), (generation, vec![kubelet]));
    let synced = node(&center, "n-new").await.unwrap();
    assert_eq!(synced.labels.get("pool").map(String::as_str), Some("gpu"));
    assert!(synced.onboarding && synced.kubernetes_synced_time.is_some(), "{synced:?}");

    // The remediator holds the node on "components converged"; `nodes show` says why.
    let scrape = format!("http://127.0.0.1:{metrics}/metrics");
    let held_by = |gate: &'static str| {
        let scrape = scrape.clone();
        async move {
            wait_for(&format!("the remediator holding the node on {gate}"), Duration::from_secs(20), || async {
                let text = nodekeeper_tests::try_http_get(&scrape).await.ok()?;
                let label = format!("gate=\"{gate}\"");
                (metric_where(&text, "nodekeeper_remediator_onboarding_waiting_nodes", &label) == Some(1.0))
                    .then_some(())
            })
            .await
        }
    };
    held_by("components converged").await;
    assert!(startup_tainted(&api, "n-new"));
    let (code, out, err) = cli(&center.url(), &["nodes", "show", "--cluster", "c1", "--node", "n-new"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("waiting to onboard (startup taint)"), "{out}");
    let gate_line = |name: &str| out.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_owned();
    assert!(gate_line("agent connected").contains("yes"), "{out}");
    assert!(gate_line("components converged").contains("the node reported generation 0, desired is"), "{out}");
    assert!(gate_line("condition LogCollectorReady").contains("not reported"), "{out}");

    // Converged: now held by the operator's condition, still tainted.
    let converged = ComponentStatus {
        name: "kubelet".into(),
        desired_version: "1.31.0-1".into(),
        installed_version: "1.31.0-1".into(),
        phase: ComponentPhase::Converged as i32,
        running: true,
        ..Default::default()
    };
    agent
        .send(agent_message::Msg::ComponentStatus(ComponentStatusReport { components: vec![converged], generation }))
        .await;
    held_by("condition LogCollectorReady").await;
    assert!(startup_tainted(&api, "n-new"));
    let (_, list, _) = cli(&center.url(), &["nodes", "list"]).await;
    assert!(list.contains("Waiting to onboard: 1 node(s); held by condition LogCollectorReady: 1"), "{list}");

    // The log collector reports ready: the taint goes, and the center records it.
    log_collector_ready(&center, "r1", "n-new", true).await;
    wait_for("the startup taint removed", Duration::from_secs(20), || async {
        (!startup_tainted(&api, "n-new")).then_some(())
    })
    .await;
    let onboarded = wait_for("onboarded in the center", Duration::from_secs(10), || async {
        node(&center, "n-new").await.filter(|n| n.onboarded_time.is_some())
    })
    .await;
    assert!(!onboarded.onboarding && onboarded.gates.iter().all(|g| g.holds), "{onboarded:?}");
    let events = stored_events(center.channel().await, "n-new", "NodeOnboarded").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].attributes["issuer"].contains("insecure"), "{:?}", events[0]);
    // The node's other taints and labels are as the kubelet left them.
    assert_eq!(api.kube.node("n-new")["metadata"]["labels"]["pool"], "gpu");

    // The gate fails again later: onboarding does not taint the node again.
    log_collector_ready(&center, "r2", "n-new", false).await;
    wait_for("the gate failing again", Duration::from_secs(10), || async {
        let n = node(&center, "n-new").await?;
        n.gates.iter().any(|g| g.name == "condition LogCollectorReady" && !g.holds).then_some(())
    })
    .await;
    two_passes(&api).await;
    assert!(!startup_tainted(&api, "n-new"));
    let patches: Vec<String> =
        api.kube.requests().into_iter().filter(|r| r.starts_with("PATCH /api/v1/nodes/n-new ")).collect();
    assert_eq!(patches.len(), 1, "one write: the taint's removal: {patches:?}");
    let text = http_get(&scrape).await;
    assert_eq!(metric_where(&text, "nodekeeper_remediator_onboarding_waiting_nodes", ""), None, "{text}");
}

/// The next event of `kind` about `node` a subscriber of the cluster receives.
async fn next_of(
    sub: &mut tonic::Streaming<nodekeeper_proto::v1::SubscribeResponse>,
    kind: &str,
    node: &str,
) -> nodekeeper_proto::v1::Event {
    let read = async {
        loop {
            match sub.message().await.unwrap().and_then(|m| m.msg) {
                Some(subscribe_response::Msg::Event(e)) if e.r#type == kind && e.node == node => return e,
                Some(_) => continue,
                None => panic!("subscription ended"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect(kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_follow_kubernetes_and_deleted_nodes_are_decommissioned() {
    let metrics = free_port();
    let center = center(&format!("metrics_listen = \"127.0.0.1:{metrics}\"\n")).await;
    let lost_nodes = || async move {
        let text = http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
        metric_where(&text, "nodekeeper_eventcenter_nodes", "state=\"lost\"")
    };
    let api = kubeapi::Server::start().await;
    for n in ["n-a", "n-b", "n-d", "n-e"] {
        api.kube.register_node(n, json!({ "zone": "a" }), &[]);
    }
    let _a = AgentConn::connect(&center.url(), hello("c1", "n-a", "b1")).await.unwrap();
    // n-b, n-d and n-e registered and went away (their agents are not connected); n-x is a node
    // outside Kubernetes.
    for n in ["n-b", "n-d", "n-e", "n-x"] {
        let mut h = hello("c1", n, "b1");
        if n == "n-b" {
            // n-b beats every second: lost 3 s after its agent left.
            h.heartbeat_interval = Some(nodekeeper_common::time::to_duration(Duration::from_secs(1)));
        }
        drop(AgentConn::connect(&center.url(), h).await.unwrap());
    }
    // n-b has an open fault.
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest {
            producer: "raid-checker".into(),
            reports: vec![condition_report("f1", "c1", "n-b", "RaidDegraded", true, RecommendedAction::None)],
        })
        .await
        .unwrap();
    let mut sub = EventServiceClient::new(center.channel().await)
        .subscribe(SubscribeRequest {
            filter: Some(EventFilter { clusters: vec!["c1".into()], ..Default::default() }),
            start: StartPosition::Now as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let _remediator = remediator(&center, &api, "");

    // Labels: synced, then followed.
    wait_for("n-a's zone in the center", Duration::from_secs(20), || async {
        node(&center, "n-a").await.filter(|n| n.labels.get("zone").map(String::as_str) == Some("a"))
    })
    .await;
    let first = next_of(&mut sub, "NodeLabelsChanged", "n-a").await;
    assert_eq!(first.attributes["changed"], "+zone");
    api.kube.set_labels("n-a", json!({ "zone": "b", "role": "gpu" }));
    let changed = next_of(&mut sub, "NodeLabelsChanged", "n-a").await;
    assert_eq!(changed.message, "Kubernetes labels changed: +role, ~zone");
    let n = node(&center, "n-a").await.unwrap();
    assert_eq!(n.labels.get("zone").map(String::as_str), Some("b"));
    assert_eq!(n.labels.get("role").map(String::as_str), Some("gpu"));

    // Deleted from Kubernetes with its agent gone (and lost): decommissioned, its fault closed,
    // no longer counted lost, and subscribers told.
    wait_for("n-b lost", Duration::from_secs(20), || async { (lost_nodes().await == Some(1.0)).then_some(()) }).await;
    api.kube.delete_node("n-b");
    let gone = next_of(&mut sub, "NodeDecommissioned", "n-b").await;
    assert_eq!((gone.node.as_str(), gone.attributes["reason"].as_str()), ("n-b", "deleted from Kubernetes"));
    let b = node(&center, "n-b").await.unwrap();
    assert!(b.decommissioned_time.is_some());
    let listed: Vec<String> = FleetServiceClient::new(center.channel().await)
        .list_nodes(ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(listed, ["n-a", "n-d", "n-e", "n-x"]);
    let faults = FleetServiceClient::new(center.channel().await)
        .list_faults(ListFaultsRequest { nodes: vec!["n-b".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .faults;
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].state(), FaultState::Resolved);
    assert_eq!(faults[0].resolution, "node decommissioned: deleted from Kubernetes");
    assert_eq!(lost_nodes().await.unwrap_or(0.0), 0.0, "a decommissioned node is not lost");

    // Deleted while its agent is connected (a Node registering again): left alone. Two at once,
    // above the pass's limit of one: left to a person.
    api.kube.delete_node("n-a");
    api.kube.delete_node("n-d");
    api.kube.delete_node("n-e");
    two_passes(&api).await;
    for n in ["n-a", "n-d", "n-e"] {
        assert!(node(&center, n).await.unwrap().decommissioned_time.is_none(), "{n} decommissioned");
    }
    // A node outside Kubernetes leaves by hand, with a reason.
    let (code, out, err) =
        cli(&center.url(), &["nodes", "delete", "--cluster", "c1", "--node", "n-x", "--reason", "RMA ticket 4711"])
            .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node c1/n-x decommissioned; 0 open fault(s) closed"), "{out}");
    let by_hand = next_of(&mut sub, "NodeDecommissioned", "n-x").await;
    assert_eq!(by_hand.attributes["reason"], "RMA ticket 4711");
    let (code, _, err) =
        cli(&center.url(), &["nodes", "delete", "--cluster", "c1", "--node", "n-a", "--reason", "test"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has its agent connected"), "{err}");
    let (_, out, _) = cli(&center.url(), &["nodes", "list", "--decommissioned", "-o", "json"]).await;
    let states: Vec<(String, bool)> = json_lines(&out)
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n.get("decommissionedTime").is_some()))
        .collect();
    let expected = [("n-a", false), ("n-b", true), ("n-d", false), ("n-e", false), ("n-x", true)];
    assert_eq!(states, expected.map(|(n, d)| (n.to_owned(), d)));

    // A decommissioned node whose agent comes back is registered again.
    let _b = AgentConn::connect(&center.url(), hello("c1", "n-b", "b2")).await.unwrap();
    let again = next_of(&mut sub, "NodeRegistered", "n-b").await;
    assert!(again.message.contains("again"), "{again:?}");
    assert!(node(&center, "n-b").await.unwrap().decommissioned_time.is_none());
}
