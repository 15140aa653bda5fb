//! System tests of nodekeeper-eventcenter: the real binary as a separate process, real gRPC
//! clients, kill -9 and restarts.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    Condition, ConditionStatus, EventFilter, GetLogInfoRequest, Heartbeat, ListEventsRequest, Observation, Report,
    ReportRequest, StartPosition, SubscribeRequest, SubscribeResponse, agent_message,
    event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
    report_service_client::ReportServiceClient, subscribe_response,
};
use nodekeeper_tests::{
    AgentConn, EventCenter, cli, hello, json_lines, observation, sequences, stored_events, wait_for,
};
use tonic::Code;
use tonic::transport::Channel;

const QUICK: &str = "[nodes]\ncheck_interval = \"50ms\"\n";

/// Every test event of `node`.
async fn events_of(ch: Channel, node: &str) -> Vec<nodekeeper_proto::v1::Event> {
    stored_events(ch, node, "TestEvent").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_batch_twice_and_interleaved_is_stored_once_in_sequence_order() {
    let center = EventCenter::start(QUICK).await;
    let mut a = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    let batch: Vec<Observation> = (1..=50).map(observation).collect();
    let first = a.send_acked(1, batch.clone()).await;
    assert_eq!((first.stored, first.duplicates, first.last_sequence), (50, 0, 50));
    let again = a.send_acked(2, batch).await;
    assert_eq!((again.stored, again.duplicates), (0, 50));

    // Two connections of the same node send the same chunks, interleaved.
    let mut x = AgentConn::connect(&center.url(), hello("c1", "n2", "b1")).await.unwrap();
    let mut y = AgentConn::connect(&center.url(), hello("c1", "n2", "b1")).await.unwrap();
    let mut stored = 0;
    for chunk in 0..10u64 {
        let obs: Vec<Observation> = (chunk * 10 + 1..=chunk * 10 + 10).map(observation).collect();
        let (first, second) = if chunk % 2 == 0 { (&mut x, &mut y) } else { (&mut y, &mut x) };
        stored += first.send_acked(chunk, obs.clone()).await.stored;
        let dup = second.send_acked(chunk, obs).await;
        assert_eq!(dup.duplicates, 10);
    }
    assert_eq!(stored, 100);
    // The reconnecting agent learns where the center is.
    let z = AgentConn::connect(&center.url(), hello("c1", "n2", "b1")).await.unwrap();
    assert_eq!(z.welcome.last_stored_sequence, 100);

    let ch = center.channel().await;
    assert_eq!(sequences(&events_of(ch.clone(), "n1").await), (1..=50).collect::<Vec<_>>());
    assert_eq!(sequences(&events_of(ch, "n2").await), (1..=100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_newest_events_come_first_page_by_page() {
    let center = EventCenter::start(QUICK).await;
    let mut a = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    let mut b = AgentConn::connect(&center.url(), hello("c1", "n2", "b1")).await.unwrap();
    for chunk in 0..5u64 {
        a.send_acked(chunk, (chunk * 10 + 1..=chunk * 10 + 10).map(observation).collect()).await;
        b.send_acked(chunk, (chunk * 10 + 1..=chunk * 10 + 10).map(observation).collect()).await;
    }
    let mut client = EventServiceClient::new(center.channel().await);
    let ask = |before: String| ListEventsRequest {
        filter: Some(EventFilter {
            clusters: vec!["c1".into()],
            nodes: vec!["n1".into()],
            types: vec!["TestEvent".into()],
            ..Default::default()
        }),
        limit: 20,
        newest_first: true,
        before_cursor: before,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut before = String::new();
    for expected in [20, 20, 10] {
        let page = client.list_events(ask(before)).await.unwrap().into_inner();
        assert_eq!(page.events.len(), expected);
        assert!(page.events.iter().all(|e| e.node == "n1"));
        seen.extend(sequences(&page.events));
        before = page.next_cursor;
    }
    assert_eq!(before, "", "no older page");
    assert_eq!(seen, (1..=50).rev().collect::<Vec<_>>());

    // The index needs one node; it scans back, not forth.
    let mut no_node = ask(String::new());
    no_node.filter.as_mut().unwrap().nodes.clear();
    let err = client.list_events(no_node).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("exactly one cluster and one node"), "{}", err.message());
    let err =
        client.list_events(ListEventsRequest { after_cursor: "1".into(), ..ask(String::new()) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A producer that keeps every unacknowledged batch and resends it after reconnecting, as the
/// agent's outbox does.
async fn stream_until(url: String, node: &str, total: u64, acked: Arc<AtomicU64>) {
    let mut pending: BTreeMap<u64, Vec<Observation>> = BTreeMap::new();
    let mut next_seq = 1;
    let mut batch_id = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::SeqCst) < total {
        assert!(Instant::now() < deadline, "producer did not finish");
        let Ok(mut conn) = AgentConn::connect(&url, hello("c1", node, "b1")).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        for (id, obs) in &pending {
            conn.send_batch(*id, obs.clone()).await;
        }
        loop {
            while pending.len() < 8 && next_seq <= total {
                batch_id += 1;
                let obs: Vec<Observation> = (next_seq..next_seq + 20).map(observation).collect();
                next_seq += 20;
                conn.send_batch(batch_id, obs.clone()).await;
                pending.insert(batch_id, obs);
            }
            if pending.is_empty() {
                return;
            }
            match conn.next_ack().await {
                Ok(ack) => {
                    if let Some(obs) = pending.remove(&ack.batch_id) {
                        acked.fetch_add(obs.len() as u64, Ordering::SeqCst);
                    }
                }
                Err(_) => break, // center gone: reconnect and resend what is pending
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_observation_and_resends_the_rest() {
    let mut center = EventCenter::start(QUICK).await;
    let acked = Arc::new(AtomicU64::new(0));
    let total = 4000;
    let producer = tokio::spawn(stream_until(center.url(), "n1", total, acked.clone()));
    let a = acked.clone();
    wait_for("some acknowledgements", Duration::from_secs(30), || {
        let a = a.clone();
        async move { (a.load(Ordering::SeqCst) >= 600).then_some(()) }
    })
    .await;
    center.kill9();
    let acked_at_kill = acked.load(Ordering::SeqCst);
    assert!(acked_at_kill < total, "the kill must happen mid-stream");
    center.spawn().await;
    producer.await.unwrap();

    let seqs = sequences(&events_of(center.channel().await, "n1").await);
    assert_eq!(seqs.len() as u64, total, "every observation stored exactly once");
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "in sequence order, no gap, no duplicate");
}

async fn next_event(stream: &mut tonic::Streaming<SubscribeResponse>) -> nodekeeper_proto::v1::Event {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10s")
            .expect("stream ok")
            .expect("stream open");
        if let Some(subscribe_response::Msg::Event(e)) = msg.msg {
            return e;
        }
    }
}

fn from_oldest(filter: Option<EventFilter>) -> SubscribeRequest {
    SubscribeRequest { start: StartPosition::Oldest as i32, filter, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_resumes_from_its_cursor_exactly_once_in_order() {
    let center = EventCenter::start(QUICK).await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=100).map(observation).collect()).await;
    let only_tests = Some(EventFilter { types: vec!["TestEvent".into()], ..Default::default() });

    let mut client = EventServiceClient::new(center.channel().await);
    let mut seen = Vec::new();
    let mut stream = client.subscribe(from_oldest(only_tests.clone())).await.unwrap().into_inner();
    for _ in 0..30 {
        seen.push(next_event(&mut stream).await);
    }
    drop(stream);
    // More events arrive while the subscriber is away and after it resumes.
    agent.send_acked(2, (101..=150).map(observation).collect()).await;
    let resume = SubscribeRequest {
        after_cursor: seen.last().unwrap().cursor.clone(),
        filter: only_tests,
        ..Default::default()
    };
    let mut stream = client.subscribe(resume).await.unwrap().into_inner();
    let late = tokio::spawn(async move {
        agent.send_acked(3, (151..=200).map(observation).collect()).await;
        agent
    });
    while seen.len() < 200 {
        seen.push(next_event(&mut stream).await);
    }
    late.await.unwrap();
    assert_eq!(sequences(&seen), (1..=200).collect::<Vec<_>>());
    let cursors: Vec<u64> = seen.iter().map(|e| e.cursor.parse().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "cursors increase");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_never_skipped_past_events() {
    let center = EventCenter::start(QUICK).await;
    let mut client = EventServiceClient::new(center.channel().await);
    let filter = Some(EventFilter { types: vec!["TestEvent".into()], ..Default::default() });
    let mut stream = client
        .subscribe(SubscribeRequest { start: StartPosition::Now as i32, filter, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // Far more batches than the live channel holds, while the subscriber reads nothing.
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    let total = 3000u64;
    for b in 0..total {
        agent.send_batch(b + 1, vec![observation(b + 1)]).await;
    }
    for _ in 0..total {
        agent.next_ack().await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < total as usize {
        got.push(next_event(&mut stream).await);
    }
    assert_eq!(sequences(&got), (1..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_consumer_resumes_from_its_acknowledged_position_after_a_restart() {
    let mut center = EventCenter::start(QUICK).await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=100).map(observation).collect()).await;
    drop(agent);
    let filter = Some(EventFilter { types: vec!["TestEvent".into()], ..Default::default() });
    let mut client = EventServiceClient::new(center.channel().await);
    let req = SubscribeRequest { consumer: "remediator-c1".into(), ..from_oldest(filter.clone()) };
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    let mut last = None;
    for _ in 0..40 {
        last = Some(next_event(&mut stream).await);
    }
    let last = last.unwrap();
    client
        .ack_consumer(nodekeeper_proto::v1::AckConsumerRequest {
            consumer: "remediator-c1".into(),
            cursor: last.cursor.clone(),
        })
        .await
        .unwrap();
    drop(stream);
    center.kill9();
    center.spawn().await;

    let mut client = EventServiceClient::new(center.channel().await);
    let consumers = client.list_consumers(nodekeeper_proto::v1::ListConsumersRequest {}).await.unwrap().into_inner();
    assert_eq!(consumers.consumers[0].acked_cursor, last.cursor);
    // No cursor given: the consumer's acknowledged position is used.
    let req = SubscribeRequest { consumer: "remediator-c1".into(), filter, ..Default::default() };
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    let next = next_event(&mut stream).await;
    assert_eq!(next.origin.unwrap().sequence, 41);
    // Acknowledging an unknown consumer is an error, not a silent creation.
    let err = client
        .ack_consumer(nodekeeper_proto::v1::AckConsumerRequest { consumer: "nobody".into(), cursor: "1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_subscriber_gets_bookmarks_at_the_head() {
    let center = EventCenter::start(QUICK).await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=10).map(observation).collect()).await;
    let mut client = EventServiceClient::new(center.channel().await);
    let head = client.get_log_info(GetLogInfoRequest {}).await.unwrap().into_inner().head_cursor;
    let req = SubscribeRequest {
        filter: Some(EventFilter { types: vec!["NothingMatches".into()], ..Default::default() }),
        bookmark_interval: Some(prost_types::Duration { seconds: 0, nanos: 200_000_000 }),
        ..from_oldest(None)
    };
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    match msg.msg {
        Some(subscribe_response::Msg::Bookmark(b)) => assert_eq!(b.cursor, head),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_gets_the_expired_error() {
    let center = EventCenter::start("[store]\nretention = \"1s\"\nretention_interval = \"100ms\"\n").await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=10).map(observation).collect()).await;
    let mut client = EventServiceClient::new(center.channel().await);
    let head = client.get_log_info(GetLogInfoRequest {}).await.unwrap().into_inner().head_cursor;
    let mut c = client.clone();
    wait_for("retention to remove the events", Duration::from_secs(15), || {
        let mut c = c.clone();
        let head = head.clone();
        async move {
            let info = c.get_log_info(GetLogInfoRequest {}).await.ok()?.into_inner();
            (info.oldest_cursor == head).then_some(())
        }
    })
    .await;
    let req = SubscribeRequest { after_cursor: "1".into(), ..Default::default() };
    let err = c.subscribe(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().starts_with("cursor expired"), "{}", err.message());
    let err =
        client.list_events(ListEventsRequest { after_cursor: "1".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let (code, _, stderr) = cli(&center.url(), &["events", "list", "--from", "1"]).await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("cursor expired"), "{stderr}");
    // Starting from the oldest retained event still works.
    client.subscribe(from_oldest(None)).await.unwrap();
}

async fn lifecycle_events(ch: Channel, node: &str, kind: &str) -> Vec<nodekeeper_proto::v1::Event> {
    stored_events(ch, node, kind).await
}

fn with_interval(mut h: nodekeeper_proto::v1::Hello, ms: u64) -> nodekeeper_proto::v1::Hello {
    h.heartbeat_interval = Some(nodekeeper_common::time::to_duration(Duration::from_millis(ms)));
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_is_lost_after_its_grace_and_resumes_when_back() {
    let center = EventCenter::start(QUICK).await;
    // Heartbeat every 300 ms: grace 900 ms.
    let agent = AgentConn::connect(&center.url(), with_interval(hello("c1", "n1", "b1"), 300)).await.unwrap();
    assert_eq!(agent.welcome.grace, Some(nodekeeper_common::time::to_duration(Duration::from_millis(900))));
    for _ in 0..3 {
        agent.send(agent_message::Msg::Heartbeat(Heartbeat::default())).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    agent.send(agent_message::Msg::Heartbeat(Heartbeat::default())).await;
    let silent_since = Instant::now();
    let ch = center.channel().await;
    let c = ch.clone();
    wait_for("NodeHeartbeatLost", Duration::from_secs(10), || {
        let c = c.clone();
        async move { (!lifecycle_events(c, "n1", "NodeHeartbeatLost").await.is_empty()).then_some(()) }
    })
    .await;
    let detected = silent_since.elapsed();
    assert!(detected >= Duration::from_millis(850), "declared lost before its grace: {detected:?}");
    assert!(detected <= Duration::from_millis(2500), "declared lost too late: {detected:?}");
    let nodes = FleetServiceClient::new(ch.clone())
        .list_nodes(nodekeeper_proto::v1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].liveness, nodekeeper_proto::v1::Liveness::Lost as i32);

    agent.send(agent_message::Msg::Heartbeat(Heartbeat::default())).await;
    let c = ch.clone();
    wait_for("NodeHeartbeatResumed", Duration::from_secs(10), || {
        let c = c.clone();
        async move { (!lifecycle_events(c, "n1", "NodeHeartbeatResumed").await.is_empty()).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_center_gives_every_node_a_fresh_grace() {
    let mut center = EventCenter::start(QUICK).await;
    let nodes = ["n1", "n2", "n3"];
    for n in nodes {
        // Grace 3 s.
        AgentConn::connect(&center.url(), with_interval(hello("c1", n, "b1"), 1000)).await.unwrap();
    }
    center.kill9();
    // Down for longer than the grace: a center that trusted stored times would declare all lost.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // The fresh grace begins once the process runs: not before it is spawned.
    let restarted = Instant::now();
    center.spawn().await;
    // n1 and n2 come back within the grace; n3 stays silent.
    let a1 = AgentConn::connect(&center.url(), with_interval(hello("c1", "n1", "b1"), 1000)).await.unwrap();
    let a2 = AgentConn::connect(&center.url(), with_interval(hello("c1", "n2", "b1"), 1000)).await.unwrap();
    let ch = center.channel().await;
    let c = ch.clone();
    // n1 and n2 heartbeat until n3 is declared lost.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let heartbeats = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        while !*stopped.borrow_and_update() {
            a1.send(agent_message::Msg::Heartbeat(Heartbeat::default())).await;
            a2.send(agent_message::Msg::Heartbeat(Heartbeat::default())).await;
            tokio::select! {
                _ = every.tick() => {}
                _ = stopped.changed() => {}
            }
        }
        (a1, a2)
    });
    // On PostgreSQL the restarted center is a new replica: it takes n3 over once the killed
    // one's lease ran out (15 s), then gives it its grace.
    wait_for("n3 to be declared lost", Duration::from_secs(30), || {
        let c = c.clone();
        async move { (!lifecycle_events(c, "n3", "NodeHeartbeatLost").await.is_empty()).then_some(()) }
    })
    .await;
    assert!(restarted.elapsed() >= Duration::from_millis(2900), "n3 lost {:?} after restart", restarted.elapsed());
    stop.send_replace(true);
    let _agents = heartbeats.await.unwrap();
    for n in ["n1", "n2"] {
        assert!(lifecycle_events(ch.clone(), n, "NodeHeartbeatLost").await.is_empty(), "{n} must not be lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_status_and_leaves_the_store_intact() {
    let center = EventCenter::start("[limits]\nmax_message_bytes = 65536\n").await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=10).map(observation).collect()).await;

    // Missing or invalid identity.
    for (h, what) in [
        (hello("c1", "", "b1"), "node name"),
        (hello("c1", "Bad_Node", "b1"), "node name"),
        (hello("", "n1", "b1"), "cluster name"),
        (hello("c1", "n1", "../../etc"), "boot id"),
    ] {
        let err = AgentConn::connect(&center.url(), h).await.err().expect("rejected");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{}", err.message());
    }

    // A stream that does not start with a hello.
    {
        use nodekeeper_proto::v1::{AgentMessage, agent_service_client::AgentServiceClient};
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat::default())) }).await.unwrap();
        let err = AgentServiceClient::new(center.channel().await)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    // Invalid observations are refused one by one in the acknowledgement, with the reason; the
    // stream stays open.
    let mut a = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    let refused: Vec<(Observation, &str)> = vec![
        (Observation { r#type: "not a type".into(), ..observation(11) }, "event type"),
        (Observation { message: "x".repeat(9000), ..observation(13) }, "message is 9000 bytes"),
        (
            Observation {
                condition: Some(Condition { r#type: "TestEvent".into(), status: 0, ..Default::default() }),
                ..observation(14)
            },
            "status",
        ),
    ];
    for (i, (o, text)) in refused.into_iter().enumerate() {
        let sequence = o.sequence;
        let ack = a.send_acked(50 + i as u64, vec![o]).await;
        assert_eq!((ack.stored, ack.rejected.len()), (0, 1), "{ack:?}");
        assert_eq!(ack.rejected[0].sequence, sequence);
        assert!(ack.rejected[0].reason.contains(text), "{}", ack.rejected[0].reason);
    }
    drop(a);

    // A broken batch ends the stream with the reason.
    let bad_batches: Vec<(Vec<Observation>, Code, &str)> = vec![
        (vec![observation(12), observation(12)], Code::InvalidArgument, "increasing"),
        (
            // Over max_message_bytes: tonic's decoder refuses it with OUT_OF_RANGE and the sizes.
            (15..=30).map(|s| Observation { message: "y".repeat(8000), ..observation(s) }).collect(),
            Code::OutOfRange,
            "too large",
        ),
        ((15..=1015).map(observation).collect(), Code::ResourceExhausted, "at most 1000 allowed"),
    ];
    for (obs, code, text) in bad_batches {
        let mut a = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
        a.send_batch(99, obs).await;
        let status = a.closed_status().await;
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(text), "{}", status.message());
    }

    // A report from an invalid producer, and an invalid cursor.
    let err = ReportServiceClient::new(center.channel().await)
        .report(ReportRequest { producer: "No Such Producer".into(), reports: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = EventServiceClient::new(center.channel().await)
        .list_events(ListEventsRequest { after_cursor: "abc".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Garbage bytes on the port.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(center.addr).await.unwrap();
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        s.write_all(&garbage).await.unwrap();
        s.shutdown().await.ok();
    }
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(center.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    }

    // Still serving, and the store holds exactly what was acknowledged before.
    assert!(nodekeeper_tests::health_ok(&center.url()).await);
    let seqs = sequences(&events_of(center.channel().await, "n1").await);
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    assert_eq!(agent.send_acked(2, vec![observation(11)]).await.stored, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_idempotent_by_producer_id_and_fold_into_faults() {
    // An operator's own condition (detector verdicts are votes folded by a quorum: see the
    // detector tests).
    let center = EventCenter::start(QUICK).await;
    let mut reports = ReportServiceClient::new(center.channel().await);
    let report = |id: &str, status: ConditionStatus| Report {
        report_id: id.into(),
        cluster: "c1".into(),
        node: "n1".into(),
        observation: Some(Observation {
            r#type: "StorageUnreachable".into(),
            message: "no probe answered".into(),
            condition: Some(Condition {
                r#type: "StorageUnreachable".into(),
                status: status as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let req = ReportRequest { producer: "detector-a".into(), reports: vec![report("r1", ConditionStatus::True)] };
    let first = reports.report(req.clone()).await.unwrap().into_inner().results;
    let again = reports.report(req).await.unwrap().into_inner().results;
    assert!(!first[0].duplicate && again[0].duplicate);
    assert_eq!(first[0].cursor, again[0].cursor);

    // The same id from another producer is another report.
    let other = ReportRequest { producer: "detector-b".into(), reports: vec![report("r1", ConditionStatus::True)] };
    assert!(!reports.report(other).await.unwrap().into_inner().results[0].duplicate);

    let (code, out, err) = cli(&center.url(), &["faults", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let faults = json_lines(&out);
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0]["type"], "StorageUnreachable");
    assert_eq!(faults[0]["state"], "FAULT_STATE_OPEN");
    assert_eq!(faults[0]["count"], "2");

    let resolve = ReportRequest { producer: "detector-a".into(), reports: vec![report("r2", ConditionStatus::False)] };
    reports.report(resolve).await.unwrap();
    let id = faults[0]["id"].as_str().unwrap();
    let (code, out, err) = cli(&center.url(), &["faults", "show", id, "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let shown = &json_lines(&out)[0];
    assert_eq!(shown["fault"]["state"], "FAULT_STATE_RESOLVED");
    assert_eq!(shown["events"].as_array().unwrap().len(), 3);
    let (code, table, _) = cli(&center.url(), &["faults", "show", id]).await;
    assert_eq!(code, 0);
    assert!(table.contains("resolved") && table.contains("Timeline:"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_nodes_and_events_and_fails_clearly() {
    let center = EventCenter::start(QUICK).await;
    for n in ["n1", "n2", "n3"] {
        let mut h = hello("c1", n, "b1");
        h.inventory = Some(nodekeeper_proto::v1::Inventory {
            hostname: n.into(),
            kernel_version: "6.1.0-test".into(),
            ..Default::default()
        });
        let mut a = AgentConn::connect(&center.url(), h).await.unwrap();
        a.send_acked(1, vec![observation(1)]).await;
    }
    let (code, out, err) = cli(&center.url(), &["nodes", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let nodes = json_lines(&out);
    let names: HashSet<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, HashSet::from(["n1", "n2", "n3"]));
    assert_eq!(nodes[0]["inventory"]["kernelVersion"], "6.1.0-test");
    assert_eq!(nodes[0]["liveness"], "LIVENESS_ALIVE");

    let (code, out, _) = cli(&center.url(), &["nodes", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("CLUSTER") && out.contains("n2") && out.contains("alive"), "{out}");

    let (code, out, _) =
        cli(&center.url(), &["events", "list", "--node", "n2", "--type", "TestEvent", "-o", "json"]).await;
    assert_eq!(code, 0);
    let page = &json_lines(&out)[0];
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["events"][0]["node"], "n2");

    let (code, _, err) = cli(&center.url(), &["events", "list", "--from", "not-a-cursor"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("malformed cursor"), "{err}");
    let (code, _, err) = cli(&center.url(), &["faults", "show", "4242"]).await;
    assert_eq!(code, 4, "{err}");
    let dead = format!("http://127.0.0.1:{}", nodekeeper_tests::free_port());
    let (code, _, err) = cli(&dead, &["nodes", "list"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach the event center"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_watch_follows_new_events_as_json_lines() {
    let center = EventCenter::start(QUICK).await;
    let mut child = tokio::process::Command::new(nodekeeper_tests::bin("nodekeeper"))
        .args(["--server", &center.url(), "events", "watch", "--type", "TestEvent", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    // The watcher starts "from now": keep sending until it has seen events, then check order.
    let mut seq = 0;
    let mut seen: Vec<u64> = Vec::new();
    while seen.len() < 5 {
        seq += 1;
        agent.send_acked(seq, vec![observation(seq)]).await;
        while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
            // One Event object per line (no bookmarks without --bookmarks).
            let e: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(e.get("bookmark").is_none() && e.get("cursor").is_some(), "{line}");
            seen.push(e["origin"]["sequence"].as_str().unwrap().parse().unwrap());
        }
        assert!(seq < 100, "watch printed nothing");
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_exits_cleanly() {
    let mut center = EventCenter::start(QUICK).await;
    let mut agent = AgentConn::connect(&center.url(), hello("c1", "n1", "b1")).await.unwrap();
    agent.send_acked(1, (1..=10).map(observation).collect()).await;
    let mut sub =
        EventServiceClient::new(center.channel().await).subscribe(from_oldest(None)).await.unwrap().into_inner();
    let status = center.terminate();
    assert!(status.success(), "exit status {status:?}");
    let end = loop {
        match sub.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    assert_eq!(end.map(|s| s.code()), Some(Code::Unavailable));
    assert_eq!(agent.closed_status().await.code(), Code::Unavailable);
    center.spawn().await;
    assert_eq!(sequences(&events_of(center.channel().await, "n1").await), (1..=10).collect::<Vec<_>>());
}

/// Messages as a client of another contract version would encode them: the "newer" hello has a
/// field this center does not know (tag 50); both lack the optional fields an older client would
/// not send (inventory, heartbeat interval, labels, status port).
mod skew {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Hello {
        #[prost(string, tag = "1")]
        pub node: String,
        #[prost(string, tag = "2")]
        pub cluster: String,
        #[prost(string, tag = "3")]
        pub boot_id: String,
        #[prost(string, tag = "50")]
        pub field_from_the_future: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Observation {
        #[prost(uint64, tag = "1")]
        pub sequence: u64,
        #[prost(string, tag = "3")]
        pub r#type: String,
        #[prost(string, tag = "5")]
        pub message: String,
        #[prost(bytes = "vec", tag = "60")]
        pub future_payload: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Batch {
        #[prost(uint64, tag = "1")]
        pub batch_id: u64,
        #[prost(message, repeated, tag = "2")]
        pub observations: Vec<Observation>,
    }

    /// The oneof of AgentMessage is wire-identical to optional fields with the same tags.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AgentMessage {
        #[prost(message, optional, tag = "1")]
        pub hello: Option<Hello>,
        #[prost(message, optional, tag = "3")]
        pub observations: Option<Batch>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ack {
        #[prost(uint64, tag = "1")]
        pub batch_id: u64,
        #[prost(uint32, tag = "2")]
        pub stored: u32,
    }

    /// An older client knows only acks among the center's messages.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CenterMessage {
        #[prost(message, optional, tag = "2")]
        pub ack: Option<Ack>,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_other_contract_versions_keep_working() {
    let center = EventCenter::start(QUICK).await;
    let mut grpc = tonic::client::Grpc::new(center.channel().await);
    grpc.ready().await.unwrap();
    let msgs = vec![
        skew::AgentMessage {
            hello: Some(skew::Hello {
                node: "n1".into(),
                cluster: "c1".into(),
                boot_id: "b1".into(),
                field_from_the_future: "ignored".into(),
            }),
            observations: None,
        },
        skew::AgentMessage {
            hello: None,
            observations: Some(skew::Batch {
                batch_id: 7,
                observations: vec![skew::Observation {
                    sequence: 1,
                    r#type: "TestEvent".into(),
                    message: "from an older or newer agent".into(),
                    future_payload: vec![1, 2, 3],
                }],
            }),
        },
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/nodekeeper.v1.AgentService/Session");
    let codec = tonic_prost::ProstCodec::<skew::AgentMessage, skew::CenterMessage>::default();
    let mut stream = grpc
        .streaming(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)), path, codec)
        .await
        .unwrap()
        .into_inner();
    let ack = loop {
        let m = stream.message().await.unwrap().expect("stream open");
        if let Some(a) = m.ack {
            break a;
        }
    };
    assert_eq!((ack.batch_id, ack.stored), (7, 1));
    let events = events_of(center.channel().await, "n1").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message, "from an older or newer agent");
    // Defaults stand in for what the old client did not send.
    let node = FleetServiceClient::new(center.channel().await)
        .get_node(nodekeeper_proto::v1::GetNodeRequest { cluster: "c1".into(), node: "n1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.heartbeat_interval, Some(nodekeeper_common::time::to_duration(Duration::from_secs(10))));
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_every_service() {
    use prost::Message;
    use tonic_reflection::pb::{v1, v1alpha};

    let center = EventCenter::start(QUICK).await;
    // Exactly what the center serves: the agent's LocalAgentService shares the descriptor files
    // but is served by the agent only.
    let expected = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "nodekeeper.v1.AgentService",
        "nodekeeper.v1.EventService",
        "nodekeeper.v1.FleetService",
        "nodekeeper.v1.PermitService",
        "nodekeeper.v1.ReportService",
        "nodekeeper.v1.RolloutService",
    ];

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(center.channel().await);
    let ask = |req: v1::server_reflection_request::MessageRequest| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let reqs = vec![
        ask(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        ask(v1::server_reflection_request::MessageRequest::FileContainingSymbol("nodekeeper.v1.EventService".into())),
    ];
    let mut responses = client.server_reflection_info(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let listed = match responses.message().await.unwrap().unwrap().message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect::<HashSet<_>>()
        }
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(listed, expected.into_iter().map(str::to_owned).collect::<HashSet<_>>());
    let files = match responses.message().await.unwrap().unwrap().message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f) => f.file_descriptor_proto,
        other => panic!("unexpected {other:?}"),
    };
    let described: Vec<prost_types::FileDescriptorProto> =
        files.iter().map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap()).collect();
    let events =
        described.iter().flat_map(|f| &f.service).find(|s| s.name() == "EventService").expect("EventService described");
    let methods: Vec<&str> = events.method.iter().map(|m| m.name()).collect();
    assert!(methods.contains(&"Subscribe") && methods.contains(&"ListEvents"), "{methods:?}");
    // A generic client then fetches the dependencies by name, as grpcurl does, until every
    // message type can be decoded.
    let mut known: HashSet<String> = described.iter().map(|f| f.name().to_owned()).collect();
    let mut wanted: Vec<String> = described.iter().flat_map(|f| f.dependency.clone()).collect();
    while let Some(name) = wanted.pop() {
        if known.contains(&name) {
            continue;
        }
        let req = ask(v1::server_reflection_request::MessageRequest::FileByFilename(name.clone()));
        let mut r = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
        match r.message().await.unwrap().unwrap().message_response.unwrap() {
            v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f) => {
                for b in f.file_descriptor_proto {
                    let fd = prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap();
                    wanted.extend(fd.dependency.clone());
                    known.insert(fd.name().to_owned());
                }
            }
            other => panic!("{name} not served: {other:?}"),
        }
    }
    for f in ["nodekeeper/v1/types.proto", "google/protobuf/timestamp.proto", "google/protobuf/duration.proto"] {
        assert!(known.contains(f), "{f} not resolvable: {known:?}");
    }

    // The older v1alpha protocol answers too (grpcurl and many tools still speak it).
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(center.channel().await);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut responses = alpha.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    match responses.message().await.unwrap().unwrap().message_response.unwrap() {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            assert!(l.service.iter().any(|s| s.name == "nodekeeper.v1.AgentService"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brief_node_listing_keeps_what_a_prober_needs_and_drops_the_rest() {
    use nodekeeper_proto::v1::{Inventory, ListNodesRequest, NetworkInterface};
    let center = EventCenter::start(QUICK).await;
    let mut h = hello("c1", "n1", "b1");
    h.status_port = 9101;
    h.labels.insert("rack".into(), "r7".into());
    h.inventory = Some(Inventory {
        hostname: "n1.example".into(),
        kernel_version: "6.1.0".into(),
        interfaces: vec![NetworkInterface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            addresses: vec!["10.0.0.1/24".into()],
        }],
        ..Default::default()
    });
    let _agent = AgentConn::connect(&center.url(), h).await.unwrap();
    let fleet = FleetServiceClient::new(center.channel().await);
    let list = |brief| {
        let mut f = fleet.clone();
        async move { f.list_nodes(ListNodesRequest { brief, ..Default::default() }).await.unwrap().into_inner().nodes }
    };
    let full = list(false).await;
    let brief = list(true).await;
    assert_eq!((full.len(), brief.len()), (1, 1));
    let (full, brief) = (&full[0], &brief[0]);
    assert_eq!(full.labels.get("rack").map(String::as_str), Some("r7"));
    assert_eq!(full.inventory.as_ref().unwrap().kernel_version, "6.1.0");
    // What the detector probes with stays: identity, liveness, status port, addresses.
    assert_eq!((brief.name.as_str(), brief.cluster.as_str()), ("n1", "c1"));
    assert_eq!((brief.liveness, brief.status_port), (full.liveness, 9101));
    let inv = brief.inventory.as_ref().unwrap();
    assert_eq!(inv.interfaces[0].name, "eth0");
    assert_eq!(inv.interfaces[0].addresses, vec!["10.0.0.1/24".to_string()]);
    // The rest does not travel.
    assert!(brief.labels.is_empty() && brief.agent_version.is_empty());
    assert!(inv.hostname.is_empty() && inv.kernel_version.is_empty() && inv.interfaces[0].mac.is_empty());
}
