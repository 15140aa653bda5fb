//! Clients given several center addresses (a center's replicas, `center = "A,B"`, `--server A,B`):
//! an agent whose center dies goes on with the other, its unacknowledged observations with it; the
//! services' channel moves to the other replica when the one it uses dies; a remediator and the
//! CLI whose first address answers nothing work through the next.

use std::time::Duration;

use nodekeeper_proto::v1::{
    GetLogInfoRequest, ListNodesRequest, Node, event_service_client::EventServiceClient,
    fleet_service_client::FleetServiceClient,
};
use nodekeeper_tests::{
    Agent, AgentSpec, EventCenter, Remediator, cli, free_port, kubeapi, observation, stored_events, wait_for,
};

const CENTER: &str = "[nodes]\ncheck_interval = \"100ms\"\n";

async fn nodes(center: &EventCenter) -> Vec<Node> {
    let Ok(ch) = tokio::time::timeout(Duration::from_secs(2), center.channel()).await else { return Vec::new() };
    FleetServiceClient::new(ch)
        .list_nodes(ListNodesRequest::default())
        .await
        .map(|r| r.into_inner().nodes)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_goes_on_with_the_next_center_when_its_center_dies() {
    let mut centers = [EventCenter::start(CENTER).await, EventCenter::start(CENTER).await];
    let both = format!("{},{}", centers[0].url(), centers[1].url());
    let agent = Agent::start(AgentSpec::new("node-a", &both)).await;
    // It picked one of them.
    let first = wait_for("the agent registered with a center", Duration::from_secs(20), || async {
        for (i, c) in centers.iter().enumerate() {
            if nodes(c).await.iter().any(|n| n.name == "node-a" && n.connected) {
                return Some(i);
            }
        }
        None
    })
    .await;
    let other = 1 - first;
    assert!(nodes(&centers[other]).await.is_empty(), "connected to one center at a time");

    // Its center dies; what the agent reports next reaches the other one.
    centers[first].kill9();
    agent.emit(vec![observation(1)]).await;
    wait_for("the agent on the other center", Duration::from_secs(20), || async {
        nodes(&centers[other]).await.iter().any(|n| n.name == "node-a" && n.connected).then_some(())
    })
    .await;
    let ch = centers[other].channel().await;
    wait_for("the observation on the other center", Duration::from_secs(20), || async {
        (!stored_events(ch.clone(), "node-a", "TestEvent").await.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remediator_and_the_cli_work_through_the_address_that_answers() {
    let center = EventCenter::start(
        "[nodes]\ncheck_interval = \"100ms\"\n[permits]\nbreaker_fault_share = 1.0\n\
         [[permits.policy]]\noperation = \"isolate\"\nmax_in_flight = 10\nmax_share = 1.0\n",
    )
    .await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let both = format!("{dead},{}", center.url());

    let (code, out, err) = cli(&both, &["nodes", "list"]).await;
    assert_eq!(code, 0, "{out}{err}");

    let api = kubeapi::Server::start().await;
    api.kube.add_node("n1");
    let mut h = nodekeeper_tests::hello("c1", "n1", "b1");
    h.heartbeat_interval = Some(nodekeeper_common::time::to_duration(Duration::from_secs(60)));
    let _conn = nodekeeper_tests::AgentConn::connect(&center.url(), h).await.unwrap();
    let playbook = "poll_interval = \"200ms\"\n[[playbook]]\ntypes = [\"FailoverFault\"]\nsteps = [\"isolate\"]\n";
    let _remediator = Remediator::start(&both, &api.kubeconfig, playbook);
    let r = nodekeeper_tests::condition_report(
        "f1",
        "c1",
        "n1",
        "FailoverFault",
        true,
        nodekeeper_proto::v1::RecommendedAction::Manual,
    );
    use nodekeeper_proto::v1::{ReportRequest, report_service_client::ReportServiceClient};
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest { producer: "test-operator".into(), reports: vec![r] })
        .await
        .unwrap();
    wait_for("the node isolated by the remediator", Duration::from_secs(30), || async {
        kubeapi::cordoned_and_tainted(&api.kube.node("n1"), "nodekeeper.io/fault").1.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_channel_moves_to_another_replica_when_its_replica_dies() {
    // Two centers told apart by their logs: one event in the first, none in the second.
    let mut centers = [EventCenter::start(CENTER).await, EventCenter::start(CENTER).await];
    let mut conn = nodekeeper_tests::AgentConn::connect(&centers[0].url(), nodekeeper_tests::hello("c1", "n1", "b1"))
        .await
        .unwrap();
    conn.send_acked(1, vec![observation(1)]).await;
    let both = format!("{},{}", centers[0].url(), centers[1].url());
    let channel = nodekeeper_common::tls::center_channel(&both, None, |e| e.timeout(Duration::from_secs(2))).unwrap();
    let mut events = EventServiceClient::new(channel);
    let head = |info: nodekeeper_proto::v1::LogInfo| info.head_cursor;
    let using = head(events.get_log_info(GetLogInfoRequest {}).await.unwrap().into_inner());
    let (first, other) = if using == "0" { (1, 0) } else { (0, 1) };
    centers[first].kill9();
    let now = wait_for("calls answered by the other replica", Duration::from_secs(20), || {
        let mut events = events.clone();
        async move { events.get_log_info(GetLogInfoRequest {}).await.ok().map(|r| head(r.into_inner())) }
    })
    .await;
    let expected = head(
        EventServiceClient::new(centers[other].channel().await)
            .get_log_info(GetLogInfoRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(now, expected);
    assert_ne!(now, using);
}
