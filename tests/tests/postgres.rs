//! The event log on a real PostgreSQL 15 (a throwaway cluster per test): three replicas appending
//! at once keep one log whose cursors are contiguous and in commit order (a reader on any replica
//! never sees a gap, even for a moment), idempotent by identity; a server killed mid-ingest and
//! started again loses nothing acknowledged and stores nothing twice; a server that would
//! acknowledge without durability is refused. Conditions reported through different replicas fold
//! into one fault; a node's life (registration, reboot, liveness, Kubernetes labels,
//! decommissioning) recorded through any replica, each change once; the state beside the log
//! (guards, permits, desired components, rollouts, remediation steps) written with its events.
//! Durable consumers and retention are shared by the
//! replicas (retention run by two at once removes each event once). Leases: one leader among three contenders at any
//! moment, taken over when the leader dies or gives up, and nobody leading while the database is
//! unreachable; the leases of replicas stopped or long dead removed, a live one never.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_eventcenter::store::postgres::lease::{Lease, LeaseConfig};
use nodekeeper_eventcenter::store::postgres::{PgOptions, PgStore};
use nodekeeper_eventcenter::store::{Identity, NewEvent, StoreError, agent_origin};
use nodekeeper_proto::v1::Event;
use nodekeeper_tests::postgres::Postgres;
use tokio::task::JoinSet;

fn event(node: &str, seq: u64) -> NewEvent {
    let e = Event {
        cluster: "c1".into(),
        node: node.into(),
        r#type: "TestEvent".into(),
        message: format!("{node}/{seq}"),
        ..Default::default()
    };
    NewEvent::new(Identity::agent(&agent_origin("c1", node, "b1"), seq), e)
}

fn center_event(replica: usize, i: usize) -> NewEvent {
    let e = Event {
        cluster: "c1".into(),
        r#type: "CenterTest".into(),
        message: format!("r{replica}/{i}"),
        ..Default::default()
    };
    NewEvent::new(Identity::Center, e)
}

/// Follows the log through one replica until it has `total` events, checking at every read that
/// the first new event is the one right after what it had: the cursors it returns.
async fn follow(log: Arc<PgStore>, total: u64) -> Vec<(u64, String)> {
    let mut head = log.watch_head();
    let mut seen: Vec<(u64, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (seen.len() as u64) < total {
        let after = seen.last().map_or(0, |(c, _)| *c);
        let page = log.read_after(after, 1000).await.unwrap();
        for (i, e) in page.iter().enumerate() {
            let cursor: u64 = e.cursor.parse().unwrap();
            assert_eq!(cursor, after + 1 + i as u64, "a gap or a reordering after cursor {after}");
            seen.push((cursor, e.message.clone()));
        }
        if page.is_empty() {
            // Woken by this replica's commits and the others' notifications.
            tokio::time::timeout_at(deadline, head.changed()).await.expect("the log stopped growing").unwrap();
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_one_contiguous_log_in_commit_order() {
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    // Started together: the migrations run once.
    let (a, b, c) = tokio::join!(
        PgStore::open(&url, PgOptions::default()),
        PgStore::open(&url, PgOptions::default()),
        PgStore::open(&url, PgOptions::default())
    );
    let replicas = [Arc::new(a.unwrap()), Arc::new(b.unwrap()), Arc::new(c.unwrap())];

    const NODES: u64 = 150;
    const BATCHES: u64 = 20;
    const PER_BATCH: u64 = 10;
    const CENTER: usize = 50;
    let total = NODES * BATCHES * PER_BATCH + 3 * CENTER as u64;
    let followers: Vec<_> = replicas.iter().map(|r| tokio::spawn(follow(r.clone(), total))).collect();

    let mut producers = JoinSet::new();
    for n in 0..NODES {
        let log = replicas[n as usize % 3].clone();
        producers.spawn(async move {
            let node = format!("n{n}");
            let mut acked = BTreeMap::new();
            for batch in 0..BATCHES {
                let events: Vec<_> = (1..=PER_BATCH).map(|i| event(&node, batch * PER_BATCH + i)).collect();
                let answers = log.append(events.clone()).await.unwrap();
                assert!(answers.iter().all(|a| !a.duplicate));
                // Resent (a reconnecting agent): the same cursors, nothing stored.
                let again = log.append(events).await.unwrap();
                assert!(again.iter().all(|a| a.duplicate));
                assert_eq!(
                    again.iter().map(|a| a.cursor).collect::<Vec<_>>(),
                    answers.iter().map(|a| a.cursor).collect::<Vec<_>>()
                );
                for (i, a) in answers.iter().enumerate() {
                    acked.insert(a.cursor, format!("{node}/{}", batch * PER_BATCH + 1 + i as u64));
                }
            }
            acked
        });
    }
    for (r, log) in replicas.iter().enumerate() {
        let log = log.clone();
        producers.spawn(async move {
            let mut acked = BTreeMap::new();
            for i in 0..CENTER {
                let a = log.append(vec![center_event(r, i)]).await.unwrap();
                acked.insert(a[0].cursor, format!("r{r}/{i}"));
            }
            acked
        });
    }
    let mut acked = BTreeMap::new();
    while let Some(done) = producers.join_next().await {
        acked.extend(done.unwrap());
    }
    assert_eq!(acked.len() as u64, total, "every acknowledged event has a cursor of its own");

    let mut logs = Vec::new();
    for f in followers {
        logs.push(f.await.unwrap());
    }
    let expected: Vec<(u64, String)> = acked.into_iter().collect();
    assert_eq!(expected.first().map(|e| e.0), Some(1));
    assert_eq!(expected.last().map(|e| e.0), Some(total));
    for (r, log) in logs.iter().enumerate() {
        assert!(log == &expected, "replica {r}'s reader saw another log");
    }
    assert!(replicas.iter().all(|r| r.head() == total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_on_two_replicas_at_once_is_stored_once() {
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let a = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let b = PgStore::open(&url, PgOptions::default()).await.unwrap();
    // An agent that resends to another replica while its first attempt is still committing.
    for round in 0..200 {
        let events: Vec<_> = (1..=5).map(|i| event("n1", round * 5 + i)).collect();
        let (x, y) = tokio::join!(a.append(events.clone()), b.append(events));
        let (x, y) = (x.unwrap(), y.unwrap());
        for (x, y) in x.iter().zip(&y) {
            assert_eq!(x.cursor, y.cursor, "one cursor per identity");
            assert!(x.duplicate != y.duplicate, "stored by exactly one replica: {x:?} {y:?}");
        }
    }
    let all = follow(Arc::new(a), 1000).await;
    assert_eq!(all.iter().map(|(_, m)| m.clone()).collect::<HashSet<_>>().len(), 1000);
    assert_eq!(b.head(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_ingest_loses_and_doubles_nothing() {
    let mut pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let log = Arc::new(PgStore::open(&url, PgOptions::default()).await.unwrap());
    const NODES: u64 = 20;
    const BATCHES: u64 = 40;
    let mut producers = JoinSet::new();
    for n in 0..NODES {
        let log = log.clone();
        producers.spawn(async move {
            let node = format!("n{n}");
            let mut acked = HashSet::new();
            for batch in 0..BATCHES {
                let events: Vec<_> = (1..=5).map(|i| event(&node, batch * 5 + i)).collect();
                // An agent resends what was not acknowledged until it is.
                loop {
                    match log.append(events.clone()).await {
                        Ok(answers) => {
                            acked.extend(answers.iter().map(|a| a.cursor));
                            break;
                        }
                        Err(StoreError::Postgres { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(e) => panic!("{e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        });
    }
    // Kill the server once a part is in, and start it again.
    let mut head = log.watch_head();
    tokio::time::timeout(Duration::from_secs(60), head.wait_for(|h| *h >= 500)).await.unwrap().unwrap();
    assert!(log.head() < NODES * BATCHES * 5, "the server is killed mid-ingest");
    pg.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.spawn().await;

    let mut acked = HashSet::new();
    while let Some(done) = producers.join_next().await {
        acked.extend(done.unwrap());
    }
    let total = NODES * BATCHES * 5;
    assert_eq!(acked.len() as u64, total);
    let all = follow(log.clone(), total).await;
    assert_eq!(all.len() as u64, total, "{}", pg.log());
    let distinct: HashSet<&String> = all.iter().map(|(_, m)| m).collect();
    assert_eq!(distinct.len() as u64, total, "an event stored twice");
    assert!(acked.iter().all(|c| *c >= 1 && *c <= total));
    assert_eq!(log.read_after(total, 10).await.unwrap().len(), 0, "nothing beyond");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_would_acknowledge_without_durability_is_refused() {
    let pg = Postgres::start().await;
    let url = pg.create_database("lax").await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("ALTER DATABASE lax SET synchronous_commit = off").await.unwrap();
    match PgStore::open(&url, PgOptions::default()).await {
        Err(StoreError::NotDurable { found }) => assert_eq!(found, "off"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a log on a server without durable commits"),
    }
}

fn quick_lease() -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(200),
    }
}

/// Which of the contenders lead now (their epochs).
fn leaders(leases: &[Option<Lease>]) -> Vec<(usize, u64)> {
    leases
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.as_ref().and_then(|l| (*l.leading().borrow()).map(|e| (i, e))))
        .collect()
}

/// Watches the contenders every 20 ms until `until` holds of the leaders, checking that never
/// two lead at once; the leaders then.
async fn watch_leaders(
    leases: &[Option<Lease>],
    within: Duration,
    until: impl Fn(&[(usize, u64)]) -> bool,
) -> Vec<(usize, u64)> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = leaders(leases);
        assert!(now.len() <= 1, "two leaders at once: {now:?}");
        if until(&now) {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "leaders stayed {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_another_takes_over_when_it_dies_or_steps_down() {
    let mut pg = Postgres::start().await;
    let url = pg.create_database("lease").await;
    let log = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let mut leases: Vec<Option<Lease>> = (0..3)
        .map(|i| Some(Lease::contend(log.pool(), "singleton", &format!("replica-{i}"), quick_lease()).unwrap()))
        .collect();
    let first = watch_leaders(&leases, Duration::from_secs(10), |l| l.len() == 1).await[0];
    // Stays with it while it renews.
    watch_leaders(&leases, Duration::from_secs(3), false_after(Duration::from_secs(2))).await;
    assert_eq!(leaders(&leases), [first]);

    // The leader dies (no release): another takes over once the lease ran out, with a new epoch.
    let died = std::time::Instant::now();
    drop(leases[first.0].take());
    let second = watch_leaders(&leases, Duration::from_secs(10), |l| l.len() == 1).await[0];
    assert!(died.elapsed() >= Duration::from_millis(1000), "taken before the lease could run out");
    assert!(second.0 != first.0 && second.1 > first.1, "{first:?} then {second:?}");

    // A graceful stop gives the lease up: the last one takes it at its next try.
    let released = std::time::Instant::now();
    leases[second.0].take().unwrap().release().await;
    let third = watch_leaders(&leases, Duration::from_secs(10), |l| l.len() == 1).await[0];
    assert!(released.elapsed() < Duration::from_millis(1000), "{:?}", released.elapsed());
    assert!(third.1 > second.1);

    // The database unreachable: the leader stops leading within its renew deadline; back, it
    // leads again.
    pg.kill9();
    let gone = std::time::Instant::now();
    watch_leaders(&leases, Duration::from_secs(5), |l| l.is_empty()).await;
    // Before anyone else could have taken the lease (its duration after the last renewal).
    assert!(gone.elapsed() <= Duration::from_millis(1500), "led {:?} without the database", gone.elapsed());
    pg.spawn().await;
    watch_leaders(&leases, Duration::from_secs(15), |l| l.len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leases_of_replicas_long_gone_are_removed_and_only_theirs() {
    let pg = Postgres::start().await;
    let url = pg.create_database("gone").await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let replicas = || async {
        let rows = client.query("SELECT name FROM leases WHERE name LIKE 'replica/%'", &[]).await.unwrap();
        rows.len()
    };
    // A replica that died ten minutes ago (its lease ran out then), one stopped (it gave its lease
    // up), one alive.
    drop(PgStore::open(&url, PgOptions::default()).await.unwrap());
    client
        .execute("UPDATE leases SET expires_at = now() - interval '10 minutes' WHERE name LIKE 'replica/%'", &[])
        .await
        .unwrap();
    let stopped = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let alive = PgStore::open(&url, PgOptions::default()).await.unwrap();
    stopped.close().await;
    assert_eq!(replicas().await, 3);
    assert_eq!(alive.forget_dead_replicas(Duration::from_secs(3600)).await.unwrap(), 1, "the one that gave it up");
    assert_eq!(replicas().await, 2);
    assert_eq!(alive.forget_dead_replicas(Duration::from_secs(300)).await.unwrap(), 1, "the one gone for 10 minutes");
    assert_eq!(alive.forget_dead_replicas(Duration::ZERO).await.unwrap(), 0, "a live lease is never removed");
    assert_eq!(replicas().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_owner_is_gone_are_taken_over_and_only_those() {
    let pg = Postgres::start().await;
    let url = pg.create_database("adopt").await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let owner = |node: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one("SELECT owner FROM nodes WHERE name = $1", &[&node]).await.unwrap();
            row.get::<_, Option<String>>(0)
        }
    };
    let gone = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let alive = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let taker = PgStore::open(&url, PgOptions::default()).await.unwrap();
    gone.hello(hello_of("n-gone", "b1")).await.unwrap();
    alive.hello(hello_of("n-alive", "b1")).await.unwrap();
    taker.hello(hello_of("n-taker", "b1")).await.unwrap();
    // A node nobody ever watched (as `migrate` leaves them).
    alive.hello(hello_of("n-unowned", "b1")).await.unwrap();
    client.execute("UPDATE nodes SET owner = NULL WHERE name = 'n-unowned'", &[]).await.unwrap();
    gone.close().await;

    // The lease of a replica that still owns a node is kept, whatever its age.
    assert_eq!(alive.forget_dead_replicas(Duration::ZERO).await.unwrap(), 0);
    let mut adopted: Vec<String> = taker.adopt_nodes().await.unwrap().into_iter().map(|n| n.name).collect();
    adopted.sort();
    assert_eq!(adopted, ["n-gone", "n-unowned"]);
    let taker_id = owner("n-taker").await;
    assert!(taker_id.is_some());
    assert_eq!(owner("n-gone").await, taker_id);
    assert_eq!(owner("n-unowned").await, taker_id);
    let alive_owner = owner("n-alive").await;
    assert!(alive_owner.is_some() && alive_owner != taker_id, "a node of a live replica stays with it");
    assert!(taker.adopt_nodes().await.unwrap().is_empty(), "nothing is left to take");
    assert!(alive.adopt_nodes().await.unwrap().is_empty(), "nothing is left to take");
    // Now that nothing names it, the stopped replica's lease goes.
    assert_eq!(alive.forget_dead_replicas(Duration::ZERO).await.unwrap(), 1);
}

/// A condition that turns true after `d` from its first call.
fn false_after(d: Duration) -> impl Fn(&[(usize, u64)]) -> bool {
    let start = std::time::Instant::now();
    move |_| start.elapsed() >= d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_retention_are_shared_by_the_replicas() {
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let a = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let b = PgStore::open(&url, PgOptions::default()).await.unwrap();
    a.append((1..=50).map(|i| event("n1", i)).collect()).await.unwrap();
    let between = nodekeeper_common::time::to_unix_ms(std::time::SystemTime::now()) + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.append((51..=100).map(|i| event("n2", i)).collect()).await.unwrap();

    // A consumer made on one replica is the same on the other; positions only move forward.
    assert_eq!(a.ensure_consumer("owner:sub", 10).await.unwrap(), 10);
    assert_eq!(b.ensure_consumer("owner:sub", 99).await.unwrap(), 10, "it exists: its position stays");
    assert!(b.ack_consumer("owner:sub", 30).await.unwrap());
    assert!(a.ack_consumer("owner:sub", 20).await.unwrap());
    let listed = a.list_consumers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].acked_cursor.as_str(), listed[0].lag), ("30", a.head() - 30));
    assert!(!a.ack_consumer("owner:nobody", 5).await.unwrap());

    // A node's newest events, from either replica.
    let newest = b.node_events_before("c1", "n1", u64::MAX, 3).await.unwrap();
    assert_eq!(newest.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["n1/50", "n1/49", "n1/48"]);

    // Retention from both replicas at once, a few rows at a time: the first 50 removed once.
    let (mut removed_a, mut removed_b) = (0, 0);
    loop {
        let (x, y) = tokio::join!(a.retain(between, 7), b.retain(between, 7));
        let (x, y) = (x.unwrap(), y.unwrap());
        (removed_a, removed_b) = (removed_a + x, removed_b + y);
        if x == 0 && y == 0 {
            break;
        }
    }
    assert_eq!(removed_a + removed_b, 50);
    assert_eq!((a.floor().await.unwrap(), b.floor().await.unwrap()), (50, 50));
    let rest = a.read_after(0, 1000).await.unwrap();
    assert_eq!(rest.first().map(|e| e.cursor.as_str()), Some("51"));
    assert_eq!(rest.len(), 50);

    assert!(a.delete_consumer("owner:sub").await.unwrap());
    assert!(!b.delete_consumer("owner:sub").await.unwrap());
    assert!(b.list_consumers().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_through_different_replicas_fold_into_one_fault() {
    use nodekeeper_proto::v1::{Condition, ConditionStatus, FaultState};
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let replicas = [
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
    ];
    let condition = |seq: u64, status: ConditionStatus| {
        let mut e = event("n1", seq);
        e.event.r#type = "KernelDeadlock".into();
        e.event.condition =
            Some(Condition { r#type: "KernelDeadlock".into(), status: status as i32, ..Default::default() });
        NewEvent::new(e.identity, e.event)
    };
    // Opened through one, seen again and resolved through the other, then open again.
    let steps = [
        (1, ConditionStatus::True, 0),
        (2, ConditionStatus::True, 1),
        (3, ConditionStatus::False, 0),
        (4, ConditionStatus::True, 1),
    ];
    let mut cursors = Vec::new();
    for (seq, status, r) in steps {
        cursors.push(replicas[r].append(vec![condition(seq, status)]).await.unwrap()[0].cursor);
    }
    // A resend folds nothing twice.
    assert!(replicas[0].append(vec![condition(2, ConditionStatus::True)]).await.unwrap()[0].duplicate);

    let events = replicas[1].read_after(0, 10).await.unwrap();
    let faults: Vec<u64> = events.iter().map(|e| e.fault_id).collect();
    assert_eq!(faults[0], faults[1]);
    assert_eq!(faults[1], faults[2]);
    assert!(faults[0] != 0 && faults[3] != 0 && faults[3] != faults[0], "{faults:?}");
    let (first, timeline) = replicas[0].get_fault(faults[0]).await.unwrap().unwrap();
    assert_eq!((first.state, first.count), (FaultState::Resolved as i32, 3));
    assert_eq!(first.opened_cursor, cursors[0].to_string());
    assert_eq!(timeline.iter().map(|e| e.cursor.parse::<u64>().unwrap()).collect::<Vec<_>>(), cursors[..3]);
    let (second, timeline) = replicas[1].get_fault(faults[3]).await.unwrap().unwrap();
    assert_eq!((second.state, second.count, timeline.len()), (FaultState::Open as i32, 1, 1));
    // The condition's transition time is the center's: it moved at each change of status.
    let t = |i: usize| events[i].condition.as_ref().unwrap().last_transition_time;
    assert_eq!(t(0), t(1), "kept while the status stays");
    assert_ne!(t(1), t(2));
}

fn hello(boot: &str) -> nodekeeper_eventcenter::store::NodeHello {
    hello_of("n1", boot)
}

fn hello_of(node: &str, boot: &str) -> nodekeeper_eventcenter::store::NodeHello {
    nodekeeper_eventcenter::store::NodeHello {
        cluster: "c1".into(),
        node: node.into(),
        boot_id: boot.into(),
        agent_version: "0.1.0".into(),
        inventory: Default::default(),
        labels: Default::default(),
        heartbeat_interval: Duration::from_secs(10),
        status_port: 0,
        opens_stream: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_life_is_recorded_once_through_any_replica() {
    use nodekeeper_eventcenter::store::NodeKey;
    use nodekeeper_proto::v1::{Condition, ConditionStatus, FaultState, Liveness};
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let (a, b) = (
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
    );
    let key = NodeKey { cluster: "c1".into(), node: "n1".into() };
    let types = |events: &[Event]| events.iter().map(|e| e.r#type.clone()).collect::<Vec<_>>();

    assert_eq!(a.hello(hello("b1")).await.unwrap().last_stored_sequence, 0);
    b.append((1..=5).map(|i| event("n1", i)).collect()).await.unwrap();
    // Again through the other replica: where its events stand, nothing new recorded.
    assert_eq!(b.hello(hello("b1")).await.unwrap().last_stored_sequence, 5);
    a.hello(hello("b2")).await.unwrap();
    let log = a.read_after(0, 100).await.unwrap();
    assert_eq!(
        types(&log).iter().filter(|t| *t != "TestEvent").collect::<Vec<_>>(),
        ["NodeRegistered", "NodeRebooted"]
    );

    // Both replicas decide the node is lost at once: one transition, by its owner (the replica
    // of its last stream's hello); the other learns the node is not its to watch.
    let (x, y) = tokio::join!(
        a.set_liveness(key.clone(), true, Duration::from_secs(30)),
        b.set_liveness(key.clone(), true, Duration::from_secs(30))
    );
    assert!(x.unwrap(), "a owns the node");
    assert!(!y.unwrap(), "b does not");
    let node = b.get_node(key.clone()).await.unwrap().unwrap();
    assert_eq!((node.liveness(), node.boot_id.as_str()), (Liveness::Lost, "b2"));
    let lost = a.read_after(0, 100).await.unwrap().into_iter().filter(|e| e.r#type == "NodeHeartbeatLost").count();
    assert_eq!(lost, 1);

    // Kubernetes' labels; an unknown node is none of the center's.
    let labels: std::collections::HashMap<String, String> = [("pool".to_owned(), "a".to_owned())].into();
    let changed =
        a.sync_kubernetes(key.clone(), labels.clone(), false, false, "remediator".into()).await.unwrap().unwrap();
    assert!(changed.changed && changed.labels.is_some_and(|l| l["pool"] == "a"));
    assert!(
        b.sync_kubernetes(key.clone(), labels, false, false, "remediator".into())
            .await
            .unwrap()
            .is_some_and(|c| !c.changed)
    );
    let stranger = NodeKey { cluster: "c1".into(), node: "n9".into() };
    assert!(a.sync_kubernetes(stranger, Default::default(), false, false, "r".into()).await.unwrap().is_none());

    // An open fault, then the node decommissioned through the other replica: the fault closes.
    let mut open = event("n1", 6);
    open.event.condition =
        Some(Condition { r#type: "KernelDeadlock".into(), status: ConditionStatus::True as i32, ..Default::default() });
    let open = NewEvent::new(open.identity, open.event);
    a.append(vec![open]).await.unwrap();
    let done = b.decommission(key.clone(), "replaced".into(), "admin/ops".into()).await.unwrap().unwrap();
    assert_eq!((done.changed, done.faults_closed), (true, 1));
    assert!(!a.decommission(key.clone(), "again".into(), "admin/ops".into()).await.unwrap().unwrap().changed);
    let log = a.read_after(0, 100).await.unwrap();
    let fault = log.iter().find(|e| e.r#type == "TestEvent" && e.fault_id != 0).unwrap().fault_id;
    let (fault, _) = a.get_fault(fault).await.unwrap().unwrap();
    assert_eq!(fault.state, FaultState::Resolved as i32);
    assert_eq!(fault.resolution, "node decommissioned: replaced");
    assert!(b.get_node(key).await.unwrap().unwrap().decommissioned_time.is_some());
    assert_eq!(types(&log).iter().filter(|t| *t == "NodeDecommissioned").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_beside_the_log_is_written_with_its_events_through_any_replica() {
    use nodekeeper_proto::v1::{
        ClusterGuard, Condition, ConditionStatus, DesiredState, FaultState, Operation, Permit, Rollout, Severity,
    };
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let (a, b) = (
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
    );
    let action = |kind: &str| NewEvent::center_action("test", "c1", "n1", kind, kind.into(), Severity::Info, vec![]);

    // A freeze and permits, with the events of the decisions.
    let guard = ClusterGuard { cluster: "c1".into(), frozen: true, reason: "maintenance".into(), ..Default::default() };
    a.put_guard("c1".into(), prost::Message::encode_to_vec(&guard), vec![action("Frozen")]).await.unwrap();
    assert_eq!(b.guards().await.unwrap(), [guard]);
    let permit = |id: &str| Permit {
        id: id.into(),
        operation: Operation::Reboot as i32,
        cluster: "c1".into(),
        node: "n1".into(),
        ..Default::default()
    };
    b.put_permits(
        vec![(permit("p1"), true), (permit("p2"), true)],
        vec![action("PermitGranted"), action("PermitGranted")],
    )
    .await
    .unwrap();
    a.put_permits(vec![(permit("p1"), false)], vec![action("PermitReleased")]).await.unwrap();
    let mut permits = a.permits_since(0).await.unwrap();
    permits.sort_by(|x, y| x.0.id.cmp(&y.0.id));
    assert_eq!(
        permits.iter().map(|(p, active)| (p.id.as_str(), *active)).collect::<Vec<_>>(),
        [("p1", false), ("p2", true)]
    );

    // Desired components from both replicas at once: each write its own, growing generation.
    let specs = |v: &str| {
        prost::Message::encode_to_vec(&DesiredState {
            components: vec![nodekeeper_proto::v1::ComponentSpec { name: v.into(), ..Default::default() }],
            ..Default::default()
        })
    };
    let (x, y) = tokio::join!(
        a.set_desired("c1".into(), "node:n1".into(), specs("x")),
        b.set_desired("c1".into(), "node:n2".into(), specs("y"))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x != y && x > 0 && y > 0);
    let rows = b.desired_components("c1").await.unwrap();
    assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), [x.min(y), x.max(y)], "oldest generation first");

    // A rollout with its timeline and the desired components it commands.
    let rollout = Rollout { reason: "waiting for its window".into(), ..Default::default() };
    let generation = a
        .put_rollout(
            "r1".into(),
            "c1".into(),
            prost::Message::encode_to_vec(&rollout),
            vec![action("RolloutCreated"), action("RolloutStarted")],
            vec![("node:n3".into(), specs("z"))],
        )
        .await
        .unwrap();
    assert!(generation > x.max(y));
    let (stored, timeline) = b.get_rollout("r1").await.unwrap().unwrap();
    assert_eq!(stored, rollout);
    assert_eq!(a.rollout("r1").await.unwrap(), Some(rollout));
    assert_eq!(timeline.iter().map(|e| e.r#type.as_str()).collect::<Vec<_>>(), ["RolloutCreated", "RolloutStarted"]);

    // A remediation step moves its fault; resent, it changes nothing.
    let mut open = event("n1", 1);
    open.event.condition =
        Some(Condition { r#type: "KernelDeadlock".into(), status: ConditionStatus::True as i32, ..Default::default() });
    a.append(vec![NewEvent::new(open.identity, open.event)]).await.unwrap();
    let fault = a.read_after(0, 100).await.unwrap().iter().find(|e| e.fault_id != 0).unwrap().fault_id;
    let step = || {
        let mut e = Event {
            cluster: "c1".into(),
            node: "n1".into(),
            r#type: "RemediationStep".into(),
            fault_id: fault,
            ..Default::default()
        };
        e.attributes.insert("step".into(), "isolate".into());
        NewEvent::new(Identity::report("remediator-c1", "f1-isolate"), e)
    };
    let first = b.fault_action(step(), FaultState::Isolated as i32).await.unwrap();
    assert_eq!(a.fault_action(step(), FaultState::Recovering as i32).await.unwrap(), first, "the resent step");
    let (f, timeline) = a.get_fault(fault).await.unwrap().unwrap();
    assert_eq!(f.state, FaultState::Isolated as i32);
    assert_eq!(b.fault(fault).await.unwrap().map(|f| f.state), Some(FaultState::Isolated as i32));
    assert_eq!(timeline.len(), 2, "the condition event and the step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_reads_back_filtered_as_asked() {
    use nodekeeper_eventcenter::store::{FaultFilter, NodeKey};
    use nodekeeper_proto::v1::{Condition, ConditionStatus, FaultState};
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let log = PgStore::open(&url, PgOptions::default()).await.unwrap();
    // Nodes a1, a2 in cluster a and b1 in cluster b; a fault on a1 and on b1; a2 decommissioned.
    for (cluster, node) in [("a", "a1"), ("a", "a2"), ("b", "b1")] {
        let mut h = hello("boot");
        (h.cluster, h.node) = (cluster.into(), node.into());
        log.hello(h).await.unwrap();
        let e = Event {
            cluster: cluster.into(),
            node: node.into(),
            r#type: "DiskFailing".into(),
            condition: Some(Condition {
                r#type: "DiskFailing".into(),
                status: ConditionStatus::True as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        log.append(vec![NewEvent::new(Identity::agent(&agent_origin(cluster, node, "boot"), 1), e)]).await.unwrap();
    }
    log.decommission(NodeKey { cluster: "a".into(), node: "a2".into() }, "gone".into(), "admin/x".into())
        .await
        .unwrap();

    let names = |nodes: Vec<nodekeeper_proto::v1::Node>| nodes.into_iter().map(|n| n.name).collect::<Vec<_>>();
    assert_eq!(names(log.list_nodes(vec!["a".into()], false).await.unwrap()), ["a1"]);
    assert_eq!(names(log.list_nodes(vec!["a".into()], true).await.unwrap()), ["a1", "a2"]);
    assert_eq!(names(log.list_nodes(Vec::new(), false).await.unwrap()), ["a1", "b1"]);
    let a1 = log.list_nodes(vec!["a".into()], false).await.unwrap().remove(0);
    assert_eq!(a1.conditions.len(), 1, "nodes come with their conditions");
    assert_eq!(log.count_nodes("a").await.unwrap(), 1);
    assert_eq!(log.cluster_sizes().await.unwrap(), [("a".to_owned(), 1), ("b".to_owned(), 1)]);
    assert_eq!(log.list_conditions(vec!["b".into()], Vec::new()).await.unwrap().len(), 1);

    let open = FaultFilter { states: vec![FaultState::Open as i32], limit: 10, ..Default::default() };
    let faults = log.list_faults(open.clone()).await.unwrap();
    assert_eq!(faults.iter().map(|f| f.node.as_str()).collect::<Vec<_>>(), ["b1", "a1"], "newest first, a2's closed");
    let in_a = FaultFilter { clusters: vec!["a".into()], limit: 10, ..Default::default() };
    assert_eq!(log.list_faults(in_a).await.unwrap().len(), 2);
    assert_eq!(log.list_faults(FaultFilter { limit: 1, ..open }).await.unwrap().len(), 1);
    let counts = log.unresolved_fault_counts().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 2);
    let types =
        log.open_fault_types(Vec::new(), Some(NodeKey { cluster: "b".into(), node: "b1".into() })).await.unwrap();
    assert_eq!(types.len(), 1);
    assert_eq!(types[&("b".to_owned(), "b1".to_owned())], ["DiskFailing"]);
    assert!(log.list_rollouts(vec!["a".into()]).await.unwrap().is_empty());
    assert_eq!(log.consumer_position("nobody").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_live_feed_carries_what_every_replica_commits_in_order() {
    let pg = Postgres::start().await;
    let url = pg.create_database("log").await;
    let (a, b) = (
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
        PgStore::open(&url, PgOptions::default()).await.unwrap(),
    );
    let mut live = b.subscribe_live();
    for i in 1..=100 {
        let store = if i % 2 == 0 { &a } else { &b };
        store.append(vec![event("n1", i)]).await.unwrap();
    }
    // Queued in call order, answered after their commits, cursors in that order.
    let mut queued = Vec::new();
    for i in 101..=110 {
        queued.push(a.append_queued(vec![event("n1", i)]).await.unwrap());
    }
    let mut cursors = Vec::new();
    for q in queued {
        cursors.push(q.await.unwrap()[0].cursor);
    }
    assert_eq!(cursors, (101..=110).collect::<Vec<_>>());
    let mut seen = Vec::new();
    while seen.len() < 110 {
        let batch =
            tokio::time::timeout(Duration::from_secs(10), live.recv()).await.expect("the live feed stalled").unwrap();
        seen.extend(batch.iter().map(|e| e.cursor.parse::<u64>().unwrap()));
    }
    assert_eq!(seen, (1..=110).collect::<Vec<_>>(), "every event, from both replicas, in cursor order");
}
