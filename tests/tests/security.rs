//! Mutual TLS and identities: the real event center with certificates made by the real
//! `nodekeeper certs`, real gRPC clients presenting them.

use std::path::Path;
use std::time::Duration;

use nodekeeper_common::tls::TlsFiles;
use nodekeeper_proto::v1::{
    Condition, ConditionStatus, EventFilter, GetGuardStateRequest, ListEventsRequest, ListNodesRequest, Observation,
    Report, ReportRequest, StartPosition, SubscribeRequest, event_service_client::EventServiceClient,
    fleet_service_client::FleetServiceClient, permit_service_client::PermitServiceClient,
    report_service_client::ReportServiceClient, subscribe_response,
};
use nodekeeper_tests::pki::{Pki, certs};
use nodekeeper_tests::{AgentConn, EventCenter, hello, observation, stored_events, tls_channel, wait_for};
use tonic::Code;

/// The center's settings in these tests.
const NODES: &str = "[nodes]\ncheck_interval = \"50ms\"\n";

/// The identities these tests present.
async fn pki() -> Pki {
    Pki::new(&[
        ("node", "node-a", "a"),
        ("node", "node-b", "b"),
        ("subscriber", "subscriber-a", "a"),
        ("detector", "detector-a", "a"),
        ("detector", "detector-b", "a"),
    ])
    .await
}

fn condition_report(id: &str, cluster: &str, node: &str) -> Report {
    Report {
        report_id: id.into(),
        cluster: cluster.into(),
        node: node.into(),
        observation: Some(Observation {
            r#type: "NodeUnreachable".into(),
            condition: Some(Condition {
                r#type: "NodeUnreachable".into(),
                status: ConditionStatus::True as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_reporting_for_another_node_is_denied_and_nothing_is_stored() {
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let as_node_a = || async { tls_channel(&url, &pki.files("node-a")).await.unwrap() };
    for (cluster, node) in [("b", "node-b"), ("a", "node-b"), ("b", "node-a")] {
        let err =
            AgentConn::connect_channel(as_node_a().await, hello(cluster, node, "b1")).await.err().expect("denied");
        assert_eq!(err.code(), Code::PermissionDenied, "{cluster}/{node}: {err:?}");
        assert!(err.message().contains("may not report as node"), "{}", err.message());
    }
    // A subscriber certificate cannot pose as an agent either.
    let sub = tls_channel(&url, &pki.files("subscriber-a")).await.unwrap();
    let err = AgentConn::connect_channel(sub, hello("a", "node-a", "b1")).await.err().expect("denied");
    assert_eq!(err.code(), Code::PermissionDenied);
    // As itself it works.
    let mut a = AgentConn::connect_channel(as_node_a().await, hello("a", "node-a", "b1")).await.unwrap();
    assert_eq!(a.send_acked(1, vec![observation(1)]).await.stored, 1);

    // Reports: only detectors (and admins), for their clusters, under their own name.
    let mut as_node = ReportServiceClient::new(as_node_a().await);
    let req = ReportRequest { producer: String::new(), reports: vec![condition_report("r1", "a", "node-a")] };
    assert_eq!(as_node.report(req).await.unwrap_err().code(), Code::PermissionDenied);
    let mut detector = ReportServiceClient::new(tls_channel(&url, &pki.files("detector-a")).await.unwrap());
    let other_cluster = ReportRequest { producer: String::new(), reports: vec![condition_report("r2", "b", "node-b")] };
    assert_eq!(detector.report(other_cluster).await.unwrap_err().code(), Code::PermissionDenied);
    let posing = ReportRequest { producer: "detector-z".into(), reports: vec![condition_report("r3", "a", "node-a")] };
    assert_eq!(detector.report(posing).await.unwrap_err().code(), Code::PermissionDenied);
    let own = ReportRequest { producer: String::new(), reports: vec![condition_report("r4", "a", "node-a")] };
    detector.report(own).await.unwrap();

    // Nothing from the denied calls is stored.
    let ch = center.channel().await;
    let nodes =
        FleetServiceClient::new(ch.clone()).list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["node-a"]);
    assert!(stored_events(ch.clone(), "node-b", "NodeRegistered").await.is_empty());
    // The detector's verdict is stored as its vote, under the name its certificate carries; the
    // center then declares the condition (quorum 1) and names the detector as evidence (on
    // PostgreSQL the leader folds the stored votes, after the report is answered).
    let votes = stored_events(ch.clone(), "node-a", "DetectorVote").await;
    assert_eq!(votes.len(), 1);
    assert_eq!(votes[0].origin.as_ref().unwrap().producer, "detector-a", "the producer comes from the certificate");
    let unreachable = wait_for("the condition declared", Duration::from_secs(10), || async {
        Some(stored_events(ch.clone(), "node-a", "NodeUnreachable").await).filter(|e| !e.is_empty())
    })
    .await;
    assert_eq!(unreachable.len(), 1);
    assert_eq!(unreachable[0].origin.as_ref().unwrap().producer, "center");
    assert!(unreachable[0].message.contains("detector-a"), "{}", unreachable[0].message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_for_cluster_a_sees_none_of_cluster_b() {
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    for (cluster, node) in [("a", "node-a"), ("b", "node-b")] {
        let ch = tls_channel(&url, &pki.files(node)).await.unwrap();
        let mut conn = AgentConn::connect_channel(ch, hello(cluster, node, "b1")).await.unwrap();
        conn.send_acked(1, (1..=5).map(observation).collect()).await;
    }
    let ch = tls_channel(&url, &pki.files("subscriber-a")).await.unwrap();
    let mut events = EventServiceClient::new(ch.clone());
    let all =
        events.list_events(ListEventsRequest { limit: 1000, ..Default::default() }).await.unwrap().into_inner().events;
    assert!(!all.is_empty());
    assert!(all.iter().all(|e| e.cluster == "a"), "{all:?}");
    assert_eq!(all.iter().filter(|e| e.r#type == "TestEvent").count(), 5);
    let ask_b = ListEventsRequest {
        filter: Some(EventFilter { clusters: vec!["b".into()], ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(events.list_events(ask_b).await.unwrap_err().code(), Code::PermissionDenied);
    // A node's newest events: its own cluster's, not b's.
    let newest = |cluster: &str, node: &str| ListEventsRequest {
        filter: Some(EventFilter { clusters: vec![cluster.into()], nodes: vec![node.into()], ..Default::default() }),
        newest_first: true,
        ..Default::default()
    };
    let mine = events.list_events(newest("a", "node-a")).await.unwrap().into_inner().events;
    assert_eq!(mine.iter().filter(|e| e.r#type == "TestEvent").count(), 5);
    assert_eq!(events.list_events(newest("b", "node-b")).await.unwrap_err().code(), Code::PermissionDenied);
    // The guards' limits: cluster a's only.
    let guards = PermitServiceClient::new(ch.clone())
        .get_guard_state(GetGuardStateRequest { include_limits: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guards.limits.iter().map(|l| l.cluster.as_str()).collect::<Vec<_>>(), ["a"]);
    // The stream too: everything up to the first bookmark is cluster a's.
    let req = SubscribeRequest {
        start: StartPosition::Oldest as i32,
        bookmark_interval: Some(prost_types::Duration { seconds: 0, nanos: 200_000_000 }),
        ..Default::default()
    };
    let mut stream = events.subscribe(req).await.unwrap().into_inner();
    let mut seen = 0;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        match m.msg {
            Some(subscribe_response::Msg::Event(e)) => {
                assert_eq!(e.cluster, "a");
                seen += 1;
            }
            Some(subscribe_response::Msg::Bookmark(_)) => break,
            None => {}
        }
    }
    assert_eq!(seen, all.len());
    let nodes = FleetServiceClient::new(ch).list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.iter().map(|n| n.cluster.as_str()).collect::<Vec<_>>(), vec!["a"]);
    // A node certificate reads nothing.
    let as_node = tls_channel(&url, &pki.files("node-a")).await.unwrap();
    let err = EventServiceClient::new(as_node).list_events(ListEventsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// Writes a certificate for `uri` valid in [not_before, not_after], signed by the CA in `ca_dir`
/// or, without one, self-signed.
fn forge(dir: &Path, name: &str, uri: &str, ca_dir: Option<&Path>, days: (i64, i64)) -> TlsFiles {
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(days.0);
    params.not_after = now + time::Duration::days(days.1);
    let key = KeyPair::generate().unwrap();
    let cert = match ca_dir {
        Some(ca) => {
            let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca.join("ca-key.pem")).unwrap()).unwrap();
            let issuer =
                Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca.join("ca.pem")).unwrap(), ca_key).unwrap();
            params.signed_by(&key, &issuer).unwrap()
        }
        None => params.self_signed(&key).unwrap(),
    };
    let files = TlsFiles {
        ca: dir.join("server-ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_untrusted_and_self_signed_client_certificates_are_rejected() {
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let tmp = tempfile::tempdir().unwrap();
    // Clients still trust the real server.
    std::fs::copy(pki.files("admin").ca, tmp.path().join("server-ca.pem")).unwrap();
    let admin_uri = "spiffe://nodekeeper/admin/*/admin";
    let other_ca = tempfile::tempdir().unwrap();
    certs(other_ca.path(), &["init"]).await;
    let cases = [
        ("expired", forge(tmp.path(), "expired", admin_uri, Some(&pki.path()), (-30, -1))),
        ("untrusted", forge(tmp.path(), "untrusted", admin_uri, Some(other_ca.path()), (-1, 30))),
        ("self-signed", forge(tmp.path(), "selfsigned", admin_uri, None, (-1, 30))),
    ];
    for (what, files) in &cases {
        let result = match tls_channel(&url, files).await {
            Err(e) => Err(e),
            Ok(ch) => FleetServiceClient::new(ch)
                .list_nodes(ListNodesRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| format!("{s:?}")),
        };
        assert!(result.is_err(), "{what} certificate accepted");
    }
    // A certificate from the right CA without a nodekeeper identity is refused at the request.
    let anonymous = forge(tmp.path(), "anonymous", "spiffe://elsewhere/workload", Some(&pki.path()), (-1, 30));
    let ch = tls_channel(&url, &anonymous).await.unwrap();
    let err = FleetServiceClient::new(ch).list_nodes(ListNodesRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // And the real admin still gets in.
    FleetServiceClient::new(center.channel().await).list_nodes(ListNodesRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_and_certificate_are_picked_up_without_a_restart() {
    let old = pki().await;
    let mut center = old.center(NODES).await;
    let pid = center.pid();
    let new = pki().await;
    // Replace the files the center was started with, in place, as a certificate manager does.
    for (from, to) in [
        (new.files("eventcenter").key, old.files("eventcenter").key),
        (new.files("eventcenter").cert, old.files("eventcenter").cert),
        (new.files("eventcenter").ca, old.files("eventcenter").ca),
    ] {
        std::fs::copy(from, to).unwrap();
    }
    let url = center.url();
    let new_admin = new.files("admin");
    wait_for("the new CA and certificate to be served", Duration::from_secs(15), || {
        let (url, files) = (url.clone(), new_admin.clone());
        async move {
            let ch = tls_channel(&url, &files).await.ok()?;
            FleetServiceClient::new(ch).list_nodes(ListNodesRequest::default()).await.ok().map(|_| ())
        }
    })
    .await;
    // Clients of the old CA are now refused, and the center never restarted.
    let old_admin = TlsFiles { ca: new.files("admin").ca, ..old.files("admin") };
    let refused = match tls_channel(&url, &old_admin).await {
        Err(_) => true,
        Ok(ch) => FleetServiceClient::new(ch).list_nodes(ListNodesRequest::default()).await.is_err(),
    };
    assert!(refused, "a certificate of the replaced CA still works");
    assert!(center.is_running());
    assert_eq!(center.pid(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_identity_is_limited_while_another_keeps_flowing() {
    let pki = pki().await;
    let limits = "[limits]\nobservations_per_second = 200\nobservations_burst = 1000\nmax_streams_per_identity = 2\n";
    let center = pki.center(&format!("{NODES}{limits}")).await;
    let url = center.url();
    let flooder = ReportServiceClient::new(tls_channel(&url, &pki.files("detector-a")).await.unwrap());
    let mut steady = ReportServiceClient::new(tls_channel(&url, &pki.files("detector-b")).await.unwrap());

    let flood_for = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let mut floods = tokio::task::JoinSet::new();
    for t in 0..4 {
        let mut c = flooder.clone();
        floods.spawn(async move {
            let (mut accepted, mut refused, mut i) = (0u64, 0u64, 0u64);
            while started.elapsed() < flood_for {
                i += 1;
                let reports = (0..50).map(|j| condition_report(&format!("flood-{t}-{i}-{j}"), "a", "node-a")).collect();
                match c.report(ReportRequest { producer: String::new(), reports }).await {
                    Ok(_) => accepted += 50,
                    Err(s) => {
                        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                        refused += 50;
                    }
                }
            }
            (accepted, refused)
        });
    }
    // The other identity reports at its normal pace meanwhile.
    let mut latencies = Vec::new();
    let mut n = 0;
    while started.elapsed() < flood_for {
        n += 1;
        let req = ReportRequest {
            producer: String::new(),
            reports: vec![condition_report(&format!("steady-{n}"), "a", "node-a")],
        };
        let t0 = std::time::Instant::now();
        steady.report(req).await.expect("the steady identity is never refused");
        latencies.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut accepted, mut refused) = (0, 0);
    while let Some(r) = floods.join_next().await {
        let (a, r) = r.unwrap();
        accepted += a;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(refused > 0, "the flood was not limited");
    assert!(accepted as f64 <= 1000.0 + 200.0 * elapsed + 50.0, "accepted {accepted} in {elapsed:.1}s");
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(latencies.len() >= 20, "{} steady reports", latencies.len());
    assert!(median < Duration::from_millis(100), "steady median {median:?}, all {latencies:?}");

    // Streams: at most two per identity.
    let sub = tls_channel(&url, &pki.files("subscriber-a")).await.unwrap();
    let mut events = EventServiceClient::new(sub);
    let _first = events.subscribe(SubscribeRequest::default()).await.unwrap();
    let _second = events.subscribe(SubscribeRequest::default()).await.unwrap();
    let third = events.subscribe(SubscribeRequest::default()).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_carry_their_issuer_are_recorded_and_are_authorized() {
    use nodekeeper_proto::v1::{
        CommandResult, Reboot, RestartComponent, SendCommandRequest, agent_message, send_command_request,
    };
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let ch = tls_channel(&url, &pki.files("node-a")).await.unwrap();
    let mut agent = AgentConn::connect_channel(ch, hello("a", "node-a", "b1")).await.unwrap();
    let restart = |cluster: &str, node: &str| SendCommandRequest {
        cluster: cluster.into(),
        node: node.into(),
        action: Some(send_command_request::Action::RestartComponent(RestartComponent { component: "kubelet".into() })),
        ..Default::default()
    };

    let mut admin = FleetServiceClient::new(center.channel().await);
    let sent = admin.send_command(restart("a", "node-a")).await.unwrap().into_inner();
    let cmd = agent.next_command().await.unwrap();
    assert_eq!(
        (cmd.command_id.as_str(), cmd.node.as_str(), cmd.issuer.as_str()),
        (sent.command_id.as_str(), "node-a", "admin/admin")
    );
    agent
        .send(agent_message::Msg::CommandResult(CommandResult {
            command_id: cmd.command_id.clone(),
            success: true,
            message: "restarted".into(),
            ..Default::default()
        }))
        .await;
    let ch = center.channel().await;
    let c = ch.clone();
    let result = wait_for("the command's result", Duration::from_secs(10), || {
        let c = c.clone();
        async move { stored_events(c, "node-a", "CommandResult").await.into_iter().next() }
    })
    .await;
    assert_eq!(
        (result.attributes["command_id"].as_str(), result.attributes["success"].as_str()),
        (sent.command_id.as_str(), "true")
    );
    let issued = stored_events(ch, "node-a", "CommandIssued").await;
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].attributes["issuer"], "admin/admin");

    // A node cannot command, a subscriber only its clusters, a reboot needs a permit, and a node
    // that is not connected cannot be commanded.
    let mut as_node = FleetServiceClient::new(tls_channel(&url, &pki.files("node-a")).await.unwrap());
    assert_eq!(as_node.send_command(restart("a", "node-a")).await.unwrap_err().code(), Code::PermissionDenied);
    let mut sub = FleetServiceClient::new(tls_channel(&url, &pki.files("subscriber-a")).await.unwrap());
    assert_eq!(sub.send_command(restart("b", "node-b")).await.unwrap_err().code(), Code::PermissionDenied);
    let reboot =
        SendCommandRequest { action: Some(send_command_request::Action::Reboot(Reboot {})), ..restart("a", "node-a") };
    assert_eq!(sub.send_command(reboot).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(sub.send_command(restart("a", "node-z")).await.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_consumers_belong_to_the_identity_and_clusters_that_made_them() {
    use nodekeeper_proto::v1::{AckConsumerRequest, DeleteConsumerRequest, ListConsumersRequest};
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let subscribe = || SubscribeRequest {
        consumer: "remediator".into(),
        start: StartPosition::Oldest as i32,
        ..Default::default()
    };
    let ack = || AckConsumerRequest { consumer: "remediator".into(), cursor: "0".into() };
    let delete = |owner: &str| DeleteConsumerRequest { consumer: "remediator".into(), owner: owner.into() };
    let listed = |consumers: Vec<nodekeeper_proto::v1::Consumer>| -> Vec<(String, String)> {
        consumers.into_iter().map(|c| (c.name, c.owner)).collect()
    };
    let (a_owner, b_owner) = ("subscriber/a/subscriber-a", "subscriber/b/subscriber-a");

    let mut sub = EventServiceClient::new(tls_channel(&url, &pki.files("subscriber-a")).await.unwrap());
    let _a_stream = sub.subscribe(subscribe()).await.unwrap();
    let mine = sub.list_consumers(ListConsumersRequest {}).await.unwrap().into_inner().consumers;
    assert_eq!(listed(mine), vec![("remediator".to_owned(), a_owner.to_owned())]);
    sub.ack_consumer(ack()).await.unwrap();

    // A subscriber of cluster b with the same name (signed by the same CA) is another owner: it
    // neither sees, moves nor deletes cluster a's consumer.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(pki.files("admin").ca, tmp.path().join("server-ca.pem")).unwrap();
    let twin_files =
        forge(tmp.path(), "twin", "spiffe://nodekeeper/subscriber/b/subscriber-a", Some(&pki.path()), (-1, 30));
    let mut twin = EventServiceClient::new(tls_channel(&url, &twin_files).await.unwrap());
    assert!(twin.list_consumers(ListConsumersRequest {}).await.unwrap().into_inner().consumers.is_empty());
    assert_eq!(twin.ack_consumer(ack()).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(twin.delete_consumer(delete("")).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(twin.delete_consumer(delete(a_owner)).await.unwrap_err().code(), Code::PermissionDenied);
    let _b_stream = twin.subscribe(subscribe()).await.unwrap();

    // An admin sees both with their owners, moves neither, and deletes by owner.
    let mut admin = EventServiceClient::new(center.channel().await);
    let all = admin.list_consumers(ListConsumersRequest {}).await.unwrap().into_inner().consumers;
    assert_eq!(
        listed(all),
        vec![("remediator".to_owned(), a_owner.to_owned()), ("remediator".to_owned(), b_owner.to_owned())]
    );
    assert_eq!(admin.ack_consumer(ack()).await.unwrap_err().code(), Code::NotFound);
    let ambiguous = admin.delete_consumer(delete("")).await.unwrap_err();
    assert_eq!(ambiguous.code(), Code::FailedPrecondition);
    assert!(ambiguous.message().contains(a_owner) && ambiguous.message().contains(b_owner), "{}", ambiguous.message());
    admin.delete_consumer(delete(b_owner)).await.unwrap();
    assert_eq!(sub.list_consumers(ListConsumersRequest {}).await.unwrap().into_inner().consumers.len(), 1);
    admin.delete_consumer(delete("")).await.unwrap();
    assert!(sub.list_consumers(ListConsumersRequest {}).await.unwrap().into_inner().consumers.is_empty());

    // A node reads no consumers at all.
    let mut node = EventServiceClient::new(tls_channel(&url, &pki.files("node-a")).await.unwrap());
    assert_eq!(node.list_consumers(ListConsumersRequest {}).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(node.ack_consumer(ack()).await.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_freeze_and_nodes_acquire_no_permits() {
    use nodekeeper_proto::v1::{
        AcquirePermitRequest, FreezeRequest, Operation, permit_service_client::PermitServiceClient,
    };
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let acquire = AcquirePermitRequest {
        operation: Operation::Reboot as i32,
        cluster: "a".into(),
        node: "node-a".into(),
        ..Default::default()
    };
    let mut node = PermitServiceClient::new(tls_channel(&url, &pki.files("node-a")).await.unwrap());
    assert_eq!(node.acquire_permit(acquire.clone()).await.unwrap_err().code(), Code::PermissionDenied);
    let mut sub = PermitServiceClient::new(tls_channel(&url, &pki.files("subscriber-a")).await.unwrap());
    assert_eq!(
        sub.freeze(FreezeRequest { cluster: "a".into(), reason: "x".into() }).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // A subscriber acquires permits for its own clusters only.
    assert!(sub.acquire_permit(acquire.clone()).await.unwrap().into_inner().granted);
    let other = AcquirePermitRequest { cluster: "b".into(), node: "node-b".into(), ..acquire };
    assert_eq!(sub.acquire_permit(other).await.unwrap_err().code(), Code::PermissionDenied);
    let mut admin = PermitServiceClient::new(center.channel().await);
    admin.freeze(FreezeRequest { cluster: "a".into(), reason: "maintenance".into() }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_with_a_wildcard_cluster_or_name_opens_no_stream() {
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(pki.files("admin").ca, tmp.path().join("server-ca.pem")).unwrap();
    // A CA outside `nodekeeper certs` (the README's external-CA setup) can sign these.
    let cases = [
        ("wildcard-cluster", "spiffe://nodekeeper/node/*/n1", hello("a", "n1", "b1")),
        ("wildcard-cluster-b", "spiffe://nodekeeper/node/*/n1", hello("b", "n1", "b1")),
        ("wildcard-name", "spiffe://nodekeeper/node/a/*", hello("a", "n1", "b1")),
    ];
    for (name, uri, h) in cases {
        let files = forge(tmp.path(), name, uri, Some(&pki.path()), (-1, 30));
        let ch = tls_channel(&url, &files).await.unwrap();
        let err = AgentConn::connect_channel(ch, h).await.err().expect("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{name}: {err:?}");
    }
    assert!(stored_events(center.channel().await, "n1", "NodeRegistered").await.is_empty(), "nothing stored");
    // The node's own certificate still opens its stream.
    let ch = tls_channel(&url, &pki.files("node-a")).await.unwrap();
    AgentConn::connect_channel(ch, hello("a", "node-a", "b1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_local_api_refuses_callers_that_are_not_on_its_node() {
    use nodekeeper_proto::v1::{GetAgentStatusRequest, local_agent_service_client::LocalAgentServiceClient};
    use nodekeeper_tests::{Agent, AgentSpec, netns::Net};
    // An agent on a test host whose status listener is on its network address, as in `nodekeeper
    // dev` (0.0.0.0) and wherever the detector probes it; the caller is outside that host.
    let net = Net::new(1);
    let mut center = EventCenter::new("[nodes]\ncheck_interval = \"50ms\"\n");
    center.listen_everywhere();
    center.spawn().await;
    let url = format!("http://{}:{}", net.hub_ip(), center.addr.port());
    let (ns, ip) = (net.host_ns(0), net.host_ip(0));
    let agent = Agent::start(AgentSpec { netns: Some((&ns, ip)), ..AgentSpec::new("host-0", &url) }).await;
    let err = agent.try_emit(vec![observation(1)]).await.expect_err("a remote Emit is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("loopback"), "{}", err.message());
    let mut local = LocalAgentServiceClient::connect(agent.status_url()).await.unwrap();
    let err = local.get_status(GetAgentStatusRequest {}).await.expect_err("a remote GetStatus is refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    // Health (what the detector probes) still answers there, and nothing was stored.
    assert!(nodekeeper_tests::health_ok(&agent.status_url()).await);
    assert!(stored_events(center.channel().await, "host-0", "TestEvent").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lifecycle_and_rollouts_are_for_their_writers_and_clusters_only() {
    use nodekeeper_proto::v1::{
        ComponentSpec, CreateRolloutRequest, DecommissionNodeRequest, GetRolloutRequest, NodeWorkAction,
        PendingNodeWorkRequest, RecordNodeWorkRequest, RolloutSpec, RolloutStrategy, SyncKubernetesNodeRequest,
        fleet_service_client::FleetServiceClient, rollout_service_client::RolloutServiceClient,
    };
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let _a =
        AgentConn::connect_channel(tls_channel(&url, &pki.files("node-a")).await.unwrap(), hello("a", "node-a", "b1"))
            .await
            .unwrap();
    let node_b =
        AgentConn::connect_channel(tls_channel(&url, &pki.files("node-b")).await.unwrap(), hello("b", "node-b", "b1"))
            .await
            .unwrap();
    drop(node_b);
    let sync = |cluster: &str, node: &str| SyncKubernetesNodeRequest {
        cluster: cluster.into(),
        node: node.into(),
        labels: [("zone".to_owned(), "x".to_owned())].into(),
        ..Default::default()
    };
    let decommission = |cluster: &str, node: &str| DecommissionNodeRequest {
        cluster: cluster.into(),
        node: node.into(),
        reason: "t".into(),
    };
    // A node may neither tell the center what Kubernetes says nor take nodes out.
    let mut as_node = FleetServiceClient::new(tls_channel(&url, &pki.files("node-a")).await.unwrap());
    assert_eq!(as_node.sync_kubernetes_node(sync("a", "node-a")).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(
        as_node.decommission_node(decommission("a", "node-a")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // The remediator of cluster a: its own cluster only.
    let mut sub = FleetServiceClient::new(tls_channel(&url, &pki.files("subscriber-a")).await.unwrap());
    assert!(sub.sync_kubernetes_node(sync("a", "node-a")).await.unwrap().into_inner().changed);
    assert_eq!(sub.sync_kubernetes_node(sync("b", "node-b")).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(sub.decommission_node(decommission("b", "node-b")).await.unwrap_err().code(), Code::PermissionDenied);
    // Labels a Kubernetes Node cannot have are refused.
    let mut bad = sync("a", "node-a");
    bad.labels.insert("zone".into(), "x".repeat(64));
    assert_eq!(sub.sync_kubernetes_node(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let b = FleetServiceClient::new(center.channel().await)
        .get_node(nodekeeper_proto::v1::GetNodeRequest { cluster: "b".into(), node: "node-b".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(b.decommissioned_time.is_none() && b.kubernetes_labels.is_empty(), "{b:?}");

    // Rollouts: created by admins only.
    let spec = RolloutSpec {
        name: "r1".into(),
        cluster: "a".into(),
        selector: "zone=x".into(),
        components: vec![ComponentSpec {
            name: "kubelet".into(),
            package: "kubelet".into(),
            version: "1.31.2-1".into(),
            ..Default::default()
        }],
        strategy: Some(RolloutStrategy { waves: vec!["100%".into()], ..Default::default() }),
    };
    let mut sub_rollouts = RolloutServiceClient::new(tls_channel(&url, &pki.files("subscriber-a")).await.unwrap());
    let refused = sub_rollouts.create_rollout(CreateRolloutRequest { spec: Some(spec.clone()) }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut admin = RolloutServiceClient::new(center.channel().await);
    admin.create_rollout(CreateRolloutRequest { spec: Some(spec) }).await.unwrap();
    // Readers of its cluster read it.
    let mut detector = RolloutServiceClient::new(tls_channel(&url, &pki.files("detector-a")).await.unwrap());
    detector.get_rollout(GetRolloutRequest { name: "r1".into() }).await.unwrap();
    // The Kubernetes work of rollouts: the cluster's remediator (or an admin) only, and only what
    // a node waits for.
    let work = |action: NodeWorkAction| RecordNodeWorkRequest {
        rollout: "r1".into(),
        node: "node-a".into(),
        action: action as i32,
        success: true,
        message: "done".into(),
    };
    let refused = detector.record_node_work(work(NodeWorkAction::Drain)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut as_node = RolloutServiceClient::new(tls_channel(&url, &pki.files("node-a")).await.unwrap());
    let refused = as_node.pending_node_work(PendingNodeWorkRequest { cluster: "a".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = sub_rollouts.pending_node_work(PendingNodeWorkRequest { cluster: "b".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "another cluster's work");
    sub_rollouts.pending_node_work(PendingNodeWorkRequest { cluster: "a".into() }).await.unwrap();
    let stale = sub_rollouts.record_node_work(work(NodeWorkAction::Uncordon)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "node-a awaits no uncordon: {stale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_actions_carry_their_certificates_name_and_stay_in_their_cluster() {
    use nodekeeper_proto::v1::{
        Observation, RecordActionsRequest, RecordedAction, report_service_client::ReportServiceClient,
    };
    let pki = pki().await;
    let center = pki.center(NODES).await;
    let url = center.url();
    let action = |cluster: &str, producer: &str| RecordActionsRequest {
        producer: producer.into(),
        actions: vec![RecordedAction {
            action_id: format!("acl-{cluster}-{producer}"),
            cluster: cluster.into(),
            node: String::new(),
            action: Some(Observation {
                r#type: "StorageAclEntryAdded".into(),
                message: "entry added".into(),
                ..Default::default()
            }),
        }],
    };
    // A storage syncer (a subscriber certificate) records for its own cluster, as itself.
    let mut sub = ReportServiceClient::new(tls_channel(&url, &pki.files("subscriber-a")).await.unwrap());
    sub.record_actions(action("a", "")).await.unwrap();
    assert_eq!(sub.record_actions(action("b", "")).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(sub.record_actions(action("a", "storage-x")).await.unwrap_err().code(), Code::PermissionDenied);
    // Nodes and detectors record no actions.
    let mut node = ReportServiceClient::new(tls_channel(&url, &pki.files("node-a")).await.unwrap());
    assert_eq!(node.record_actions(action("a", "")).await.unwrap_err().code(), Code::PermissionDenied);
    let mut det = ReportServiceClient::new(tls_channel(&url, &pki.files("detector-a")).await.unwrap());
    assert_eq!(det.record_actions(action("a", "")).await.unwrap_err().code(), Code::PermissionDenied);
    let stored = nodekeeper_tests::stored_events(center.channel().await, "", "StorageAclEntryAdded").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].origin.as_ref().unwrap().producer, "subscriber-a");
    assert_eq!(stored[0].attributes["issuer"], "subscriber subscriber-a");
}
