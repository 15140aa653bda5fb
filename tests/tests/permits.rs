//! The rate-limit center with real processes: policies (in flight, per window, share), freezes,
//! the circuit breaker, leases, persistence across a restart, decisions as events, and reboot
//! commands that need a permit the center granted.

use std::time::Duration;

use nodekeeper_proto::v1::{
    AcquirePermitRequest, GetGuardStateRequest, GuardState, ListPermitsRequest, Operation, Reboot, RecommendedAction,
    ReleasePermitRequest, ReportMetricRequest, ReportRequest, SendCommandRequest,
    fleet_service_client::FleetServiceClient, permit_service_client::PermitServiceClient,
    report_service_client::ReportServiceClient, send_command_request,
};
use nodekeeper_tests::alertmanager::Alertmanager;
use nodekeeper_tests::{AgentConn, EventCenter, cli, condition_report, hello, stored_events, wait_for};
use tonic::transport::Channel;

const POLICY: &str = r#"
[permits]
breaker_fault_share = 0.3
[[permits.policy]]
operation = "reboot"
max_in_flight = 2
max_per_window = 3
window = "1h"
[[permits.policy]]
operation = "isolate"
max_in_flight = 10
max_share = 0.5
"#;

async fn acquire(ch: &Channel, op: Operation, node: &str, lease: Option<Duration>) -> Result<String, String> {
    let r = PermitServiceClient::new(ch.clone())
        .acquire_permit(AcquirePermitRequest {
            operation: op as i32,
            cluster: "c1".into(),
            node: node.into(),
            fault_id: 7,
            lease: lease.map(nodekeeper_common::time::to_duration),
        })
        .await
        .unwrap()
        .into_inner();
    if r.granted { Ok(r.permit.unwrap().id) } else { Err(r.denied_reason) }
}

async fn release(ch: &Channel, id: &str) {
    PermitServiceClient::new(ch.clone())
        .release_permit(ReleasePermitRequest { permit_id: id.into(), success: true })
        .await
        .unwrap();
}

/// Registers nodes n0..n{count} in cluster c1.
async fn nodes(center: &EventCenter, count: usize) {
    for i in 0..count {
        AgentConn::connect(&center.url(), hello("c1", &format!("n{i}"), "b1")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_limit_permits_and_every_decision_is_an_event() {
    let mut center = EventCenter::start(POLICY).await;
    nodes(&center, 10).await;
    let ch = center.channel().await;
    let a = acquire(&ch, Operation::Reboot, "n0", None).await.unwrap();
    assert!(acquire(&ch, Operation::Reboot, "n0", None).await.unwrap_err().contains("already holds"));
    let _b = acquire(&ch, Operation::Reboot, "n1", None).await.unwrap();
    let denied = acquire(&ch, Operation::Reboot, "n2", None).await.unwrap_err();
    assert!(denied.starts_with("max in flight: 2 reboot permits"), "{denied}");
    release(&ch, &a).await;
    let c = acquire(&ch, Operation::Reboot, "n2", None).await.unwrap();
    release(&ch, &c).await;
    // Three granted within the window: the fourth waits, though none is in flight but one.
    let denied = acquire(&ch, Operation::Reboot, "n3", None).await.unwrap_err();
    assert!(denied.starts_with("max per window: 3 reboot permits"), "{denied}");
    // Isolation: at most half of the 10 nodes.
    for i in 0..5 {
        acquire(&ch, Operation::Isolate, &format!("n{i}"), None).await.unwrap();
    }
    assert!(acquire(&ch, Operation::Isolate, "n5", None).await.unwrap_err().starts_with("max share: 6 of 10 nodes"));

    let granted = stored_events(ch.clone(), "n0", "PermitGranted").await;
    assert_eq!(granted.len(), 2, "reboot and isolate of n0");
    assert_eq!(stored_events(ch.clone(), "n3", "PermitDenied").await.len(), 1);
    assert_eq!(stored_events(ch.clone(), "n0", "PermitReleased").await.len(), 1);

    // The guards' view shows each policy's use and why it denies now.
    let state = guard_state(&ch).await;
    assert_eq!(state.breaker_fault_share, 0.3);
    assert_eq!(state.breaker_window, Some(prost_types::Duration { seconds: 300, nanos: 0 }));
    let [c1] = &state.limits[..] else { panic!("{:?}", state.limits) };
    assert_eq!((c1.cluster.as_str(), c1.nodes), ("c1", 10));
    let policy = |op: Operation| c1.policies.iter().find(|p| p.operation() == op).unwrap();
    let reboot = policy(Operation::Reboot);
    assert_eq!((reboot.in_flight, reboot.max_in_flight), (1, Some(2)));
    assert_eq!((reboot.granted_in_window, reboot.max_per_window), (3, Some(3)));
    assert!(reboot.denies.starts_with("max per window: 3 reboot permits"), "{reboot:?}");
    let isolate = policy(Operation::Isolate);
    assert_eq!((isolate.in_flight, isolate.max_share), (5, Some(0.5)));
    assert!(isolate.denies.starts_with("max share: 6 of 10 nodes"), "{isolate:?}");
    // Operations with no policy in this configuration are not listed (it replaces the defaults).
    assert!(c1.policies.iter().all(|p| matches!(p.operation(), Operation::Reboot | Operation::Isolate)), "{c1:?}");

    // Permits survive a restart of the center: still active, still counted.
    let before = PermitServiceClient::new(ch.clone())
        .list_permits(ListPermitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .permits;
    center.kill9();
    center.spawn().await;
    let ch = center.channel().await;
    let after = PermitServiceClient::new(ch.clone())
        .list_permits(ListPermitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .permits;
    assert_eq!(before, after);
    assert_eq!(after.len(), 6);
    assert!(acquire(&ch, Operation::Reboot, "n3", None).await.unwrap_err().starts_with("max per window"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezes_and_the_breaker_stop_disruption_but_not_releases() {
    let am = Alertmanager::start().await;
    let center = EventCenter::start(&format!("{POLICY}\n[alertmanager]\nurl = \"{}\"\n", am.url)).await;
    nodes(&center, 6).await;
    let ch = center.channel().await;
    let url = center.url();
    let (code, out, err) = cli(&url, &["freeze", "--cluster", "c1", "--reason", "change window"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(acquire(&ch, Operation::Reboot, "n0", None).await.unwrap_err(), "frozen: change window");
    acquire(&ch, Operation::Release, "n0", None).await.expect("releasing a healed node stays allowed");
    assert_eq!(cli(&url, &["unfreeze", "--cluster", "c1"]).await.0, 0);
    let p = acquire(&ch, Operation::Reboot, "n0", None).await.unwrap();
    release(&ch, &p).await;
    // A global freeze.
    assert_eq!(cli(&url, &["freeze", "--reason", "incident"]).await.0, 0);
    assert!(acquire(&ch, Operation::Isolate, "n1", None).await.unwrap_err().starts_with("frozen (global)"));
    assert_eq!(cli(&url, &["unfreeze"]).await.0, 0);

    // Faults open on 2 of 6 nodes (33% > 30%): the breaker trips at the next request.
    let report = |node: &str| {
        condition_report(&format!("r-{node}"), "c1", node, "StorageUnreachable", true, RecommendedAction::None)
    };
    ReportServiceClient::new(ch.clone())
        .report(ReportRequest { producer: "storage-operator".into(), reports: vec![report("n2"), report("n3")] })
        .await
        .unwrap();
    let denied = acquire(&ch, Operation::Isolate, "n4", None).await.unwrap_err();
    assert!(denied.starts_with("breaker tripped: faults opened on 2 of 6 nodes"), "{denied}");
    assert_eq!(stored_events(ch.clone(), "", "BreakerTripped").await.len(), 1);
    // The ops alert fires in Alertmanager.
    let tripped = ["alertname=\"NodekeeperBreakerTripped\"", "cluster=\"c1\""];
    let alert = wait_for("the breaker alert", Duration::from_secs(20), || async {
        am.active(&tripped).await.into_iter().next()
    })
    .await;
    assert_eq!(alert["labels"]["severity"], "critical");
    let summary = alert["annotations"]["summary"].as_str().unwrap();
    assert!(summary.contains("faults opened on 2 of 6 nodes"), "{summary}");
    acquire(&ch, Operation::Release, "n2", None).await.expect("healed nodes can still be released");
    let (_, listed, _) = cli(&url, &["permits", "list"]).await;
    assert!(listed.contains("BREAKER TRIPPED"), "{listed}");
    let (code, _, err) = cli(&url, &["breaker", "reset", "--cluster", "c1"]).await;
    assert_eq!(code, 0, "{err}");
    // The faults are still within the window, but the reset acknowledged them: only new ones count.
    acquire(&ch, Operation::Isolate, "n4", None).await.expect("granted after the reset");
    // And the alert resolves.
    wait_for("the breaker alert resolved", Duration::from_secs(20), || async {
        am.active(&tripped).await.is_empty().then_some(())
    })
    .await;
}

const GATED: &str = r#"
[[permits.policy]]
operation = "isolate"
max_in_flight = 100
[[permits.gate]]
alerts = ['alertname="PodCreationFailing"', 'cluster="{cluster}"']
[[permits.gate]]
metric = "pod_creation_success_rate"
min = 0.99
"#;

async fn guard_state(ch: &Channel) -> GuardState {
    PermitServiceClient::new(ch.clone())
        .get_guard_state(GetGuardStateRequest { include_limits: true })
        .await
        .unwrap()
        .into_inner()
}

async fn report_metric(ch: &Channel, value: f64) {
    PermitServiceClient::new(ch.clone())
        .report_metric(ReportMetricRequest { cluster: "c1".into(), name: "pod_creation_success_rate".into(), value })
        .await
        .unwrap();
}

/// A reboot of `node` is granted now (and released at once).
async fn reboot_granted(ch: &Channel, node: &str) -> Result<(), String> {
    let id = acquire(ch, Operation::Reboot, node, None).await?;
    release(ch, &id).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_or_a_metric_out_of_range_holds_disruption_until_it_clears() {
    let mut am = Alertmanager::start().await;
    let config = format!("{GATED}\n[alertmanager]\nurl = \"{}\"\nquery_interval = \"200ms\"\n", am.url);
    let center = EventCenter::start(&config).await;
    nodes(&center, 2).await;
    let ch = center.channel().await;
    // No value of the metric yet: unknown, and unknown denies.
    let denied = reboot_granted(&ch, "n0").await.unwrap_err();
    assert!(denied.starts_with("business health unknown: no value of pod_creation_success_rate"), "{denied}");
    report_metric(&ch, 1.0).await;
    reboot_granted(&ch, "n0").await.expect("healthy business: granted");

    // Another cluster's alert does not gate c1; c1's does.
    am.post(&[("alertname", "PodCreationFailing"), ("cluster", "c2")], false).await;
    reboot_granted(&ch, "n0").await.expect("c2's alert says nothing of c1");
    am.post(&[("alertname", "PodCreationFailing"), ("cluster", "c1")], false).await;
    let denied =
        wait_for("the gate to close", Duration::from_secs(20), || async { reboot_granted(&ch, "n0").await.err() })
            .await;
    assert!(
        denied.starts_with("business health: 1 alert(s) firing") && denied.contains("PodCreationFailing"),
        "{denied}"
    );
    acquire(&ch, Operation::Release, "n1", None).await.expect("releases pass a closed gate");
    let events = stored_events(ch.clone(), "n0", "PermitDenied").await;
    assert!(events.iter().any(|e| e.message.contains("PodCreationFailing")), "the denial is an event");
    am.post(&[("alertname", "PodCreationFailing"), ("cluster", "c1")], true).await;
    wait_for("the gate to open", Duration::from_secs(20), || async { reboot_granted(&ch, "n0").await.ok() }).await;

    // The metric out of its range closes it; back in range opens it.
    report_metric(&ch, 0.93).await;
    let denied = reboot_granted(&ch, "n0").await.unwrap_err();
    assert!(
        denied.contains("pod_creation_success_rate = 0.93 in cluster c1") && denied.contains("below 0.99"),
        "{denied}"
    );
    let gates = guard_state(&ch).await.limits.remove(0).gates;
    let metric = gates.iter().find(|g| g.gate.starts_with("pod_creation_success_rate")).unwrap();
    assert_eq!((metric.state.as_str(), metric.denies), ("closed", true), "{gates:?}");
    assert!(metric.reason.contains("below 0.99"), "{metric:?}");
    report_metric(&ch, 0.999).await;
    reboot_granted(&ch, "n0").await.expect("back in range");
    let gates = guard_state(&ch).await.limits.remove(0).gates;
    assert!(gates.iter().all(|g| g.state == "open" && !g.denies), "{gates:?}");

    // Alertmanager gone: business health is unknown, and unknown denies.
    am.kill();
    let denied =
        wait_for("the gate to notice", Duration::from_secs(20), || async { reboot_granted(&ch, "n0").await.err() })
            .await;
    assert!(denied.starts_with("business health unknown: Alertmanager"), "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_command_needs_a_permit_the_center_granted() {
    let center = EventCenter::start(POLICY).await;
    let ch = center.channel().await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n0", "b1")).await.unwrap();
    AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    let send = |permit: &str| {
        let ch = ch.clone();
        let permit = permit.to_owned();
        async move {
            FleetServiceClient::new(ch)
                .send_command(SendCommandRequest {
                    cluster: "c1".into(),
                    node: "n0".into(),
                    action: Some(send_command_request::Action::Reboot(Reboot {})),
                    permit_id: permit,
                    fault_id: 7,
                })
                .await
        }
    };
    let e = send("0123456789abcdef").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("was not granted"), "{}", e.message());
    let other = acquire(&ch, Operation::Reboot, "n1", None).await.unwrap();
    assert!(send(&other).await.unwrap_err().message().contains("is for reboot on node n1"));
    let isolate = acquire(&ch, Operation::Isolate, "n0", None).await.unwrap();
    assert!(send(&isolate).await.unwrap_err().message().contains("is for isolate on node n0"));
    let short = acquire(&ch, Operation::Reboot, "n0", Some(Duration::from_millis(300))).await.unwrap();
    let sent = send(&short).await.expect("a granted, active permit");
    let cmd = agent.next_command().await.unwrap();
    assert_eq!((cmd.command_id, cmd.permit_id.as_str()), (sent.into_inner().command_id, short.as_str()));
    // The lease passes: the permit no longer allows anything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match send(&short).await {
            Err(e) if e.message().contains("expired") || e.message().contains("no longer active") => break,
            _ if tokio::time::Instant::now() > deadline => panic!("the permit outlived its lease"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_steps_join_the_fault_timeline_and_move_its_state() {
    use nodekeeper_proto::v1::{FaultState, GetFaultRequest, RecordStepRequest};
    let center = EventCenter::start(POLICY).await;
    let ch = center.channel().await;
    let report = condition_report("r-1", "c1", "n0", "KernelDeadlock", true, RecommendedAction::None);
    ReportServiceClient::new(ch.clone())
        .report(ReportRequest { producer: "kernel-watch".into(), reports: vec![report] })
        .await
        .unwrap();
    let fleet = FleetServiceClient::new(ch.clone());
    let fault_id = fleet
        .clone()
        .list_faults(nodekeeper_proto::v1::ListFaultsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .faults[0]
        .id;
    let step = |id: &str, step: &str, state: FaultState| RecordStepRequest {
        step_id: id.into(),
        fault_id,
        step: step.into(),
        message: format!("{step} done"),
        success: true,
        state: state as i32,
        ..Default::default()
    };
    let first = fleet.clone().record_step(step("s-1", "isolate", FaultState::Isolated)).await.unwrap().into_inner();
    // Resent: the same event, nothing new.
    let again = fleet.clone().record_step(step("s-1", "isolate", FaultState::Isolated)).await.unwrap().into_inner();
    assert_eq!(first.cursor, again.cursor);
    fleet.clone().record_step(step("s-2", "reboot", FaultState::Recovering)).await.unwrap();
    let e = fleet.clone().record_step(step("s-3", "resolve", FaultState::Resolved)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let unknown = RecordStepRequest { fault_id: 999, ..step("s-4", "x", FaultState::Unspecified) };
    assert_eq!(fleet.clone().record_step(unknown).await.unwrap_err().code(), tonic::Code::NotFound);

    let got = fleet.clone().get_fault(GetFaultRequest { id: fault_id }).await.unwrap().into_inner();
    assert_eq!(got.fault.unwrap().state(), FaultState::Recovering);
    let steps: Vec<_> = got
        .events
        .iter()
        .filter(|e| e.r#type == "RemediationStep")
        .map(|e| (e.attributes["step"].as_str(), e.attributes["fault_state"].as_str()))
        .collect();
    assert_eq!(steps, [("isolate", "isolated"), ("reboot", "recovering")]);
    // `faults show` lists the steps.
    let (code, out, err) = cli(&center.url(), &["faults", "show", &fault_id.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("isolate: isolate done") && out.contains("reboot: reboot done"), "{out}");
}
