//! Event center replicas (real processes) on one real PostgreSQL 15 (a throwaway cluster per
//! test): permits decided atomically across replicas (two replicas racing for the last slot 1,000
//! times never both grant it); a replica killed with `kill -9` mid-ingest loses nothing it
//! acknowledged, its agents go on with the others and no node is declared lost, the nodes it
//! watched alone are watched by another, and the work that runs once moves to another replica;
//! 500 agent streams over three replicas, a subscriber on each: the same contiguous log on all; a
//! primary with a synchronous standby killed and the standby promoted: the center goes on, nothing
//! acknowledged lost; `migrate` of a SQLite center's history: every event, cursor, fault, consumer
//! position and permit there; detector votes reaching different replicas fold into one verdict.

use std::time::Duration;

use nodekeeper_proto::v1::{
    AckConsumerRequest, AcquirePermitRequest, AgentMessage, Condition, ConditionStatus, Event, EventFilter,
    GetLogInfoRequest, ListConsumersRequest, ListFaultsRequest, ListNodesRequest, ListPermitsRequest, Observation,
    ObservationBatch, Operation, ReleasePermitRequest, Report, ReportRequest, SubscribeRequest, agent_message,
    center_message, event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
    permit_service_client::PermitServiceClient, report_service_client::ReportServiceClient, subscribe_response,
};
use nodekeeper_tests::postgres::Postgres;
use nodekeeper_tests::{
    Agent, AgentConn, AgentSpec, EventCenter, events_where, free_port, hello, metric, observation, sequences,
    stored_events, try_http_get, wait_for,
};
use tonic::transport::Channel;

/// `n` replicas of a center configured with `config` (without a [store] section) on a new
/// database of `pg`.
async fn replicas(pg: &Postgres, n: usize, config: &str) -> Vec<EventCenter> {
    let url = pg.create_database("nodekeeper").await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(EventCenter::start(&replica_config(&url, config).0).await);
    }
    out
}

/// A replica's config on the database at `url`, with its own metrics listener: (config, port).
fn replica_config(url: &str, config: &str) -> (String, u16) {
    let port = free_port();
    (format!("metrics_listen = \"127.0.0.1:{port}\"\n{config}\n[store]\npostgres_url = \"{url}\"\n"), port)
}

/// Sends one observation per batch to the center at `url` as node `node`, each waiting for its
/// acknowledgement, until `until` are acknowledged or the stream breaks: the task's answer is the
/// sequences acknowledged; the watch follows the last one.
async fn spawn_ingest(
    url: &str,
    node: &str,
    until: u64,
) -> (tokio::task::JoinHandle<Vec<u64>>, tokio::sync::watch::Receiver<u64>) {
    let direct = AgentConn::connect(url, hello("c1", node, "b1")).await.unwrap();
    let (tx, mut rx) = direct.into_parts();
    let (acked_tx, acked_rx) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut acked = Vec::new();
        for seq in 1..=until {
            let batch = ObservationBatch { batch_id: seq, observations: vec![observation(seq)] };
            let msg = AgentMessage { msg: Some(agent_message::Msg::Observations(batch)) };
            if tx.send(msg).await.is_err() {
                break;
            }
            let ack = loop {
                match rx.message().await {
                    Ok(Some(m)) => match m.msg {
                        Some(center_message::Msg::Ack(a)) => break Some(a),
                        _ => continue,
                    },
                    _ => break None,
                }
            };
            let Some(ack) = ack else { break };
            assert_eq!(ack.batch_id, seq);
            acked.push(seq);
            acked_tx.send_replace(seq);
        }
        acked
    });
    (task, acked_rx)
}

/// Checks that every acknowledged sequence of `node` is stored, none twice.
async fn assert_stored(ch: Channel, node: &str, acked: &[u64]) {
    let stored = sequences(&stored_events(ch, node, "TestEvent").await);
    let stored_set: std::collections::BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored_set.len(), stored.len(), "stored twice");
    let lost: Vec<u64> = acked.iter().filter(|s| !stored_set.contains(s)).copied().collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}

/// Whether the replica whose metrics listen on `port` leads the work that runs once.
async fn leads(port: u16) -> bool {
    let text = try_http_get(&format!("http://127.0.0.1:{port}/metrics")).await.unwrap_or_default();
    metric(&text, "nodekeeper_eventcenter_leader") == Some(1.0)
}

/// Every stored event of type `kind` (every event: "").
async fn events_of_type(ch: Channel, kind: &str) -> Vec<Event> {
    let types = if kind.is_empty() { Vec::new() } else { vec![kind.into()] };
    events_where(ch, EventFilter { types, ..Default::default() }).await
}

async fn acquire(ch: Channel, node: String) -> Option<String> {
    let r = PermitServiceClient::new(ch)
        .acquire_permit(AcquirePermitRequest {
            operation: Operation::Reboot as i32,
            cluster: "c1".into(),
            node,
            fault_id: 1,
            lease: None,
        })
        .await
        .expect("acquire")
        .into_inner();
    if r.granted {
        Some(r.permit.expect("a granted permit").id)
    } else {
        assert!(r.denied_reason.contains("max in flight"), "denied for another reason: {}", r.denied_reason);
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_for_the_last_permit_never_both_get_it() {
    let pg = Postgres::start().await;
    let centers = replicas(
        &pg,
        2,
        "[permits]\nbreaker_fault_share = 1.0\n[[permits.policy]]\noperation = \"reboot\"\nmax_in_flight = 1\n",
    )
    .await;
    let a = centers[0].channel().await;
    let b = centers[1].channel().await;
    const ROUNDS: usize = 1000;
    let mut granted_on = [0usize; 2];
    for round in 0..ROUNDS {
        let (on_a, on_b) =
            tokio::join!(acquire(a.clone(), format!("a{round}")), acquire(b.clone(), format!("b{round}")));
        let (id, winner) = match (on_a, on_b) {
            (Some(id), None) => (id, 0),
            (None, Some(id)) => (id, 1),
            (Some(x), Some(y)) => panic!("round {round}: both replicas granted the last slot ({x}, {y})"),
            // The slot is free at the start of every round: one of them must have it.
            (None, None) => panic!("round {round}: neither replica granted the free slot"),
        };
        granted_on[winner] += 1;
        // Released through the replica that did not grant it: the other's permit is known there.
        let other = if winner == 0 { b.clone() } else { a.clone() };
        PermitServiceClient::new(other)
            .release_permit(ReleasePermitRequest { permit_id: id, success: true })
            .await
            .unwrap_or_else(|e| panic!("round {round}: release through another replica: {e}"));
    }
    // Both replicas won some rounds (they really raced), and every grant is on record once.
    assert!(granted_on.iter().all(|n| *n > 0), "one replica won every round: {granted_on:?}");
    assert_eq!(events_of_type(a.clone(), "PermitGranted").await.len(), ROUNDS, "one grant recorded per round");
    assert_eq!(events_of_type(a.clone(), "PermitReleased").await.len(), ROUNDS, "one release recorded per round");
    let active = PermitServiceClient::new(b).list_permits(ListPermitsRequest::default()).await.unwrap().into_inner();
    assert!(active.permits.is_empty(), "all released: {:?}", active.permits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_ingest_loses_nothing_and_no_node_is_declared_lost() {
    let pg = Postgres::start().await;
    let url = pg.create_database("nodekeeper").await;
    let config = "[nodes]\ncheck_interval = \"100ms\"\n";
    // The victim starts first: it leads, and every agent connects to it (the others are not up).
    let (victim_config, victim_metrics) = replica_config(&url, config);
    let mut victim = EventCenter::new(&victim_config);
    let others_config = [replica_config(&url, config), replica_config(&url, config)];
    let mut others = [EventCenter::new(&others_config[0].0), EventCenter::new(&others_config[1].0)];
    victim.spawn().await;
    wait_for("the first replica leads", Duration::from_secs(20), || async {
        leads(victim_metrics).await.then_some(())
    })
    .await;
    let all = format!("{},{},{}", victim.url(), others[0].url(), others[1].url());
    let names: Vec<String> = (0..6).map(|i| format!("node-{i}")).collect();
    let mut agents = Vec::new();
    for name in &names {
        let mut spec = AgentSpec::new(name, &all);
        spec.heartbeat = "1s";
        agents.push(Agent::start(spec).await);
    }
    for a in &agents {
        a.wait_connected().await;
    }
    for o in &mut others {
        o.spawn().await;
    }
    let reader = others[0].channel().await;

    // Ingest straight into the victim, every batch acknowledged or not, until it dies.
    let (ingest, mut acked_rx) = spawn_ingest(&victim.url(), "direct", u64::MAX).await;
    // The agents go on reporting while it dies; one of them dies with it.
    for a in &agents {
        a.emit(vec![observation(0), observation(0)]).await;
    }
    acked_rx.wait_for(|n| *n >= 200).await.unwrap();
    let mut dead_agent = agents.pop().expect("an agent");
    victim.kill9();
    dead_agent.kill9();
    let acked = ingest.await.unwrap();
    assert!(acked.len() >= 200);

    // Nothing acknowledged lost, nothing stored twice.
    assert_stored(reader.clone(), "direct", &acked).await;

    // The surviving agents go on with the other replicas, and what they report arrives.
    for (i, a) in agents.iter().enumerate() {
        let mut o = observation(0);
        o.message = format!("after {i}");
        a.emit(vec![o]).await;
    }
    for (i, a) in agents.iter().enumerate() {
        wait_for("an agent's report after the kill", Duration::from_secs(30), || async {
            let events = stored_events(reader.clone(), &a.node, "TestEvent").await;
            events.iter().any(|e| e.message == format!("after {i}")).then_some(())
        })
        .await;
    }
    // The work that runs once moved to another replica.
    wait_for("another replica leads", Duration::from_secs(30), || async {
        let mut n = 0;
        for (_, port) in &others_config {
            n += usize::from(leads(*port).await);
        }
        (n == 1).then_some(())
    })
    .await;
    // The agent that died with the replica is watched by another (its lease ran out) and
    // declared lost; none of the others ever is.
    let declared = wait_for("the dead agent's node declared lost", Duration::from_secs(60), || async {
        let lost = events_of_type(reader.clone(), "NodeHeartbeatLost").await;
        (!lost.is_empty()).then_some(lost)
    })
    .await;
    let lost_nodes: Vec<&str> = declared.iter().map(|e| e.node.as_str()).collect();
    assert_eq!(lost_nodes, vec![dead_agent.node.as_str()], "only the dead agent's node is lost");
    // A negative assertion needs a window: a node wrongly taken over would be declared lost one
    // grace (3 s) after the takeover, as the dead agent's was.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let lost_nodes: Vec<String> =
        events_of_type(reader.clone(), "NodeHeartbeatLost").await.into_iter().map(|e| e.node).collect();
    assert_eq!(lost_nodes, vec![dead_agent.node.clone()], "no false NodeHeartbeatLost");
}

/// Runs `nodekeeper-eventcenter migrate`; (exit code, stderr).
async fn migrate(from: &str, to: &str) -> (i32, String) {
    let out = tokio::process::Command::new(nodekeeper_tests::bin("nodekeeper-eventcenter"))
        .args(["migrate", "--from", from, "--to", to])
        .env("RUST_LOG", "info")
        .output()
        .await
        .expect("run migrate");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// What a center holds, as its API answers: every event (cursor, type, node, message), faults
/// (id, type, state), consumers' positions, active permits, nodes.
type Holdings =
    (Vec<(String, String, String, String)>, Vec<(u64, String, i32)>, Vec<(String, String)>, Vec<String>, Vec<String>);

async fn holdings(ch: Channel) -> Holdings {
    let events = events_of_type(ch.clone(), "").await;
    let events = events.into_iter().map(|e| (e.cursor, e.r#type, e.node, e.message)).collect();
    let faults = FleetServiceClient::new(ch.clone())
        .list_faults(ListFaultsRequest { limit: 10_000, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .faults
        .into_iter()
        .map(|f| (f.id, f.r#type, f.state))
        .collect();
    let consumers = EventServiceClient::new(ch.clone())
        .list_consumers(ListConsumersRequest {})
        .await
        .unwrap()
        .into_inner()
        .consumers
        .into_iter()
        .map(|c| (c.name, c.acked_cursor))
        .collect();
    let permits = PermitServiceClient::new(ch.clone())
        .list_permits(ListPermitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .permits
        .into_iter()
        .map(|p| p.id)
        .collect();
    let nodes = FleetServiceClient::new(ch)
        .list_nodes(ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.name)
        .collect();
    (events, faults, consumers, permits, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_a_sqlite_history_with_its_cursors() {
    // A SQLite center with a history: events, a fault, a consumer's position, a permit.
    let mut sqlite = EventCenter::start("[permits]\nbreaker_fault_share = 1.0\n").await;
    let ch = sqlite.channel().await;
    let mut agent = AgentConn::connect(&sqlite.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=50).map(observation).collect()).await;
    let mut fault = observation(51);
    fault.r#type = "KernelDeadlock".into();
    fault.condition =
        Some(Condition { r#type: "KernelDeadlock".into(), status: ConditionStatus::True as i32, ..Default::default() });
    agent.send_acked(2, vec![fault]).await;
    drop(agent);
    let mut events = EventServiceClient::new(ch.clone());
    let sub = SubscribeRequest { consumer: "downstream".into(), after_cursor: "0".into(), ..Default::default() };
    drop(events.subscribe(sub).await.unwrap());
    events.ack_consumer(AckConsumerRequest { consumer: "downstream".into(), cursor: "20".into() }).await.unwrap();
    assert!(acquire(ch.clone(), "n1".into()).await.is_some());
    let before = holdings(ch).await;
    assert!(before.0.len() > 50 && before.1.len() == 1 && before.2.len() == 1 && before.3.len() == 1);
    assert!(sqlite.terminate().success());

    // Copied into an empty database, the PostgreSQL center holds the same.
    let pg = Postgres::start().await;
    let url = pg.create_database("nodekeeper").await;
    let from = format!("sqlite:{}", sqlite.data_dir.display());
    let (code, log) = migrate(&from, &format!("postgres:{url}")).await;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("table=\"events\"") || log.contains("table=events"), "progress per table: {log}");
    let center = EventCenter::start(&replica_config(&url, "").0).await;
    let ch = center.channel().await;
    assert_eq!(holdings(ch.clone()).await, before);

    // The numbering goes on from there, and an agent's identities are known: what it sent is
    // stored, and its next event follows the head.
    let head: u64 = before.0.last().unwrap().0.parse().unwrap();
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    assert_eq!(agent.welcome.last_stored_sequence, 51);
    assert_eq!(agent.send_acked(3, vec![observation(52)]).await.stored, 1);
    let after = events_of_type(ch, "TestEvent").await;
    assert_eq!(after.last().map(|e| e.cursor.parse::<u64>().unwrap()), Some(head + 1), "numbering goes on");

    // A second copy into a database that holds a history is refused; a malformed location too.
    let (code, log) = migrate(&from, &format!("postgres:{url}")).await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("not empty"), "{log}");
    let (code, log) = migrate(&sqlite.data_dir.display().to_string(), &url).await;
    assert_eq!(code, 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_goes_on_with_the_promoted_standby_and_loses_nothing_acknowledged() {
    let mut primary = Postgres::start_primary().await;
    let standby = primary.standby().await;
    primary.create_database("nodekeeper").await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/nodekeeper?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let center = EventCenter::start(&replica_config(&url, "").0).await;
    const BATCHES: u64 = 300;
    let (ingest, mut acked) = spawn_ingest(&center.url(), "n1", BATCHES).await;
    acked.wait_for(|n| *n >= 100).await.unwrap();
    // The primary dies mid-ingest; the standby is promoted. The center finds it through the URL's
    // second host and goes on: the stream stays open, acknowledgements resume.
    primary.kill9();
    standby.promote();
    let acked = ingest.await.unwrap();
    assert_eq!(acked.len() as u64, BATCHES, "the stream went on across the failover");
    assert_stored(center.channel().await, "n1", &acked).await;
    // What the center acknowledged is on the promoted standby itself.
    let (client, conn) = tokio_postgres::connect(&standby.url("nodekeeper"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let stored: i64 = client
        .query_one("SELECT COUNT(*) FROM events e JOIN origins o ON o.id = e.origin WHERE o.key LIKE 'a/c1/n1/%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as u64, BATCHES);
}

/// Follows the whole log through one replica from its start until it has seen cursor `until`
/// (sent once known): the cursors it delivered, in order.
async fn follow_all(ch: Channel, until: tokio::sync::watch::Receiver<u64>) -> Vec<u64> {
    let mut stream = EventServiceClient::new(ch)
        .subscribe(SubscribeRequest { after_cursor: "0".into(), ..Default::default() })
        .await
        .expect("subscribe")
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let target = *until.borrow();
        if target > 0 && seen.last().is_some_and(|c| *c >= target) {
            return seen;
        }
        let next = tokio::time::timeout(Duration::from_secs(60), stream.message()).await;
        let m = next.expect("a subscriber waited 60 s for the next event").expect("subscription").expect("open");
        if let Some(subscribe_response::Msg::Event(e)) = m.msg {
            seen.push(e.cursor.parse().expect("cursor"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_every_replica_see_the_same_log_from_500_streams() {
    let pg = Postgres::start().await;
    let centers = replicas(&pg, 3, "").await;
    let mut channels = Vec::new();
    for c in &centers {
        channels.push(c.channel().await);
    }
    // A subscriber on each replica, from the start of the log.
    let (head_tx, head_rx) = tokio::sync::watch::channel(0u64);
    let subscribers: Vec<_> = channels.iter().map(|ch| tokio::spawn(follow_all(ch.clone(), head_rx.clone()))).collect();
    // 500 agent streams spread over the replicas, each sending 10 batches of 5 observations,
    // every batch acknowledged.
    const STREAMS: usize = 500;
    let mut producers = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let url = centers[i % centers.len()].url();
        producers.spawn(async move {
            let mut conn = AgentConn::connect(&url, hello("c1", &format!("n{i}"), "b1")).await.expect("connect");
            for b in 0..10u64 {
                let ack = conn.send_acked(b + 1, (b * 5 + 1..=b * 5 + 5).map(observation).collect()).await;
                assert_eq!(ack.stored, 5);
            }
            conn
        });
    }
    let mut conns = Vec::new();
    while let Some(c) = producers.join_next().await {
        conns.push(c.expect("a producer"));
    }
    let head: u64 = EventServiceClient::new(channels[0].clone())
        .get_log_info(GetLogInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .head_cursor
        .parse()
        .unwrap();
    head_tx.send_replace(head);
    let mut seen = Vec::new();
    for s in subscribers {
        seen.push(s.await.expect("a subscriber"));
    }
    // One sequence, contiguous from the first cursor, every event once, the same on every replica.
    let expected: Vec<u64> = (1..=head).collect();
    for (i, s) in seen.iter().enumerate() {
        let upto: Vec<u64> = s.iter().copied().filter(|c| *c <= head).collect();
        assert_eq!(upto.len() as u64, head, "replica {i}: a gap or a duplicate");
        assert_eq!(upto, expected, "replica {i}: not the log in cursor order");
    }
    let stored = events_of_type(channels[1].clone(), "TestEvent").await;
    assert_eq!(stored.len(), STREAMS * 50, "every acknowledged observation stored once");
    drop(conns);
}

/// A detector's verdict about node n1, sent to the center at `ch`.
async fn vote(ch: Channel, detector: &str, id: &str, holds: bool) {
    let status = if holds { ConditionStatus::True } else { ConditionStatus::False };
    let report = Report {
        report_id: id.into(),
        cluster: "c1".into(),
        node: "n1".into(),
        observation: Some(Observation {
            r#type: "NodeUnreachable".into(),
            message: format!("{detector}: no answer"),
            condition: Some(Condition {
                r#type: "NodeUnreachable".into(),
                status: status as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    ReportServiceClient::new(ch)
        .report(ReportRequest { producer: detector.into(), reports: vec![report] })
        .await
        .expect("report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detector_votes_through_different_replicas_reach_the_quorum() {
    let pg = Postgres::start().await;
    let centers = replicas(&pg, 2, "[detectors]\nquorum = 2\n").await;
    let (a, b) = (centers[0].channel().await, centers[1].channel().await);
    drop(AgentConn::connect(&centers[0].url(), hello("c1", "n1", "b1")).await.unwrap());
    let verdicts = |ch: Channel| async move {
        events_of_type(ch, "NodeUnreachable")
            .await
            .into_iter()
            .map(|e| e.condition.map(|c| c.status()))
            .collect::<Vec<_>>()
    };
    // One detector on each replica: neither replica heard both, the quorum of two holds.
    vote(a.clone(), "det-a", "a1", true).await;
    vote(b.clone(), "det-b", "b1", true).await;
    wait_for("the verdict recorded", Duration::from_secs(20), || async {
        (verdicts(a.clone()).await == vec![Some(ConditionStatus::True)]).then_some(())
    })
    .await;
    // Repeated views change nothing; one detector letting go clears it (below the quorum).
    vote(b.clone(), "det-b", "b2", true).await;
    vote(a.clone(), "det-a", "a2", false).await;
    wait_for("the verdict cleared", Duration::from_secs(20), || async {
        (verdicts(b.clone()).await == vec![Some(ConditionStatus::True), Some(ConditionStatus::False)]).then_some(())
    })
    .await;
}
