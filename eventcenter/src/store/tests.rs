//! Store tests: migrations against the schema, fault folding, retention, and a model-based
//! property test (random appends, duplicates, consumer acks, reads and restarts against an
//! in-memory model).

use std::collections::HashMap;

use nodekeeper_proto::v1::{Condition, ConditionStatus, Event, EventKind, FaultState};
use proptest::prelude::*;
use rusqlite::Connection;

use super::sqlite::{MIGRATIONS, open_writer};
use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn agent_event(node: &str, boot: &str, seq: u64) -> NewEvent {
    observation_event(Identity::agent(&agent_origin("c1", node, boot), seq), node, format!("{node} {boot} {seq}"))
}

fn observation_event(identity: Identity, node: &str, message: String) -> NewEvent {
    let event = Event {
        cluster: "c1".into(),
        node: node.into(),
        kind: EventKind::Observation as i32,
        r#type: "TestEvent".into(),
        message,
        origin: Some(nodekeeper_proto::v1::Origin { producer: "agent".into(), ..Default::default() }),
        ..Default::default()
    };
    NewEvent::new(identity, event)
}

fn condition_event(node: &str, seq: u64, status: ConditionStatus) -> NewEvent {
    let mut e = agent_event(node, "b1", seq).event;
    e.kind = EventKind::Condition as i32;
    e.r#type = "KernelDeadlock".into();
    e.condition = Some(Condition { r#type: "KernelDeadlock".into(), status: status as i32, ..Default::default() });
    NewEvent::new(Identity::agent(&agent_origin("c1", node, "b1"), seq), e)
}

fn schema_of(conn: &Connection) -> Vec<(String, String, String)> {
    let mut stmt = conn
        .prepare("SELECT type, name, COALESCE(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

#[test]
fn migrations_apply_to_an_empty_database_and_equal_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let conn = open_writer(&path).unwrap();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version as usize, MIGRATIONS.len());
    let expected = Connection::open_in_memory().unwrap();
    expected.execute_batch(include_str!("schema.sql")).unwrap();
    assert_eq!(schema_of(&conn), schema_of(&expected), "migrations and schema.sql disagree");
    // Durability settings are in force.
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!(sync, 2);
    // Re-opening applies nothing twice.
    drop(conn);
    open_writer(&path).unwrap();
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    open_writer(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
    assert!(matches!(open_writer(&path), Err(StoreError::SchemaTooNew { found: 99, .. })));
}

#[test]
fn duplicates_are_stored_once_and_cursors_stay_contiguous() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
        let batch: Vec<_> = (1..=5).map(|s| agent_event("n1", "b1", s)).collect();
        let first = store.append(batch.clone()).await.unwrap();
        assert!(first.iter().all(|a| !a.duplicate));
        assert_eq!(first.iter().map(|a| a.cursor).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        let mut mixed = batch[2..].to_vec();
        mixed.push(agent_event("n1", "b1", 6));
        let second = store.append(mixed).await.unwrap();
        assert_eq!(
            second.iter().map(|a| (a.cursor, a.duplicate)).collect::<Vec<_>>(),
            vec![(3, true), (4, true), (5, true), (6, false)]
        );
        // Same sequence, other boot: a different identity.
        assert!(!store.append(vec![agent_event("n1", "b2", 1)]).await.unwrap()[0].duplicate);
        assert_eq!(store.head(), 7);
        store.close().await;
    });
}

#[test]
fn conditions_fold_into_faults() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
        store.append(vec![condition_event("n1", 1, ConditionStatus::True)]).await.unwrap();
        store.append(vec![condition_event("n1", 2, ConditionStatus::True)]).await.unwrap();
        // A resend folds nothing twice.
        store.append(vec![condition_event("n1", 2, ConditionStatus::True)]).await.unwrap();
        let open = store.list_faults(FaultFilter { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].count, 2);
        assert_eq!(open[0].state, FaultState::Open as i32);
        store.append(vec![condition_event("n1", 3, ConditionStatus::False)]).await.unwrap();
        store.append(vec![condition_event("n1", 4, ConditionStatus::True)]).await.unwrap();
        let all = store.list_faults(FaultFilter { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(all.len(), 2, "a new occurrence after resolution is a new fault");
        let (first, timeline) = store.get_fault(open[0].id).await.unwrap().unwrap();
        assert_eq!(first.state, FaultState::Resolved as i32);
        assert_eq!(timeline.iter().map(|e| e.cursor.as_str()).collect::<Vec<_>>(), vec!["1", "2", "3"]);
        assert!(timeline.iter().all(|e| e.fault_id == first.id));
        let conditions = store.list_conditions(vec![], vec!["n1".into()]).await.unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].condition.as_ref().unwrap().status, ConditionStatus::True as i32);
        store.close().await;
    });
}

#[test]
fn retention_removes_a_prefix_and_raises_the_floor() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
        store.append((1..=25).map(|s| agent_event("n1", "b1", s)).collect()).await.unwrap();
        let future = nodekeeper_common::time::to_unix_ms(std::time::SystemTime::now()) + 60_000;
        assert_eq!(store.retain(future, 10).await.unwrap(), 10);
        assert_eq!(store.floor(), 10);
        assert_eq!(store.retain(future, 100).await.unwrap(), 15);
        assert_eq!(store.retain(future, 100).await.unwrap(), 0);
        assert_eq!(store.floor(), 25);
        store.close().await;
        let store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!((store.floor(), store.head()), (25, 25), "floor and head survive a restart");
        store.close().await;
    });
}

#[test]
fn a_nodes_events_come_newest_first_from_its_index() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
        // Interleaved nodes in one batch, a cluster-wide event, and a duplicate.
        let mut batch: Vec<_> = (1..=6).map(|s| agent_event(if s % 2 == 0 { "n2" } else { "n1" }, "b1", s)).collect();
        batch.push(observation_event(Identity::Center, "", "cluster-wide".into()));
        batch.push(agent_event("n1", "b1", 1));
        store.append(batch).await.unwrap();
        let key = |n: &str| NodeKey { cluster: "c1".into(), node: n.into() };
        let cursors = |events: Vec<Event>| events.iter().map(|e| e.cursor.clone()).collect::<Vec<_>>();
        assert_eq!(cursors(store.node_events_before(key("n1"), u64::MAX, 10).await.unwrap()), ["5", "3", "1"]);
        assert_eq!(cursors(store.node_events_before(key("n2"), 6, 1).await.unwrap()), ["4"]);
        assert!(store.node_events_before(key("n3"), u64::MAX, 10).await.unwrap().is_empty());
        store.close().await;
        // The query reads the node index, not the log.
        let conn = Connection::open(dir.path().join("eventcenter.db")).unwrap();
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT cursor, body FROM events WHERE node_ref = (SELECT id FROM origins WHERE key = 'n/c1/n1') AND cursor < 9 ORDER BY cursor DESC LIMIT 5",
            )
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(plan.iter().any(|d| d.contains("USING INDEX events_node")), "{plan:?}");
        assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "no sort: {plan:?}");
    });
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, u8, u8)>),
    Report(u8),
    EnsureConsumer(u8),
    Ack(u8, u16),
    Read(u16),
    /// Retention removes everything received so far, at most this many rows.
    Retain(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0u8..3, 0u8..2, 1u8..12), 0..6).prop_map(Op::Append),
        1 => (0u8..6).prop_map(Op::Report),
        1 => (0u8..2).prop_map(Op::EnsureConsumer),
        1 => (0u8..2, any::<u16>()).prop_map(|(c, p)| Op::Ack(c, p)),
        2 => any::<u16>().prop_map(Op::Read),
        1 => (1u8..20).prop_map(Op::Retain),
        1 => Just(Op::Restart),
    ]
}

/// What the store must hold: events by cursor (as identity strings), and consumer positions.
#[derive(Default)]
struct Model {
    log: Vec<String>,
    /// Events at or below it were removed by retention.
    floor: u64,
    index: HashMap<String, u64>,
    consumers: HashMap<String, u64>,
}

impl Model {
    fn append(&mut self, id: String) -> Appended {
        if let Some(c) = self.index.get(&id) {
            return Appended { cursor: *c, duplicate: true };
        }
        self.log.push(id.clone());
        let c = self.log.len() as u64;
        self.index.insert(id, c);
        Appended { cursor: c, duplicate: false }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Append(items) => {
                        let events: Vec<_> = items
                            .iter()
                            .map(|(n, b, s)| agent_event(&format!("n{n}"), &format!("b{b}"), u64::from(*s)))
                            .collect();
                        let got = store.append(events).await.unwrap();
                        let want: Vec<_> = items.iter().map(|(n, b, s)| model.append(format!("n{n} b{b} {s}"))).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Report(id) => {
                        let e = observation_event(Identity::report("p", &format!("r{id}")), "n0", format!("report r{id}"));
                        let got = store.append(vec![e]).await.unwrap();
                        prop_assert_eq!(got, vec![model.append(format!("report r{id}"))]);
                    }
                    Op::EnsureConsumer(c) => {
                        let name = format!("consumer-{c}");
                        let head = model.log.len() as u64;
                        let got = store.ensure_consumer(name.clone(), head).await.unwrap();
                        let want = *model.consumers.entry(name).or_insert(head);
                        prop_assert_eq!(got, want);
                    }
                    Op::Ack(c, p) => {
                        let name = format!("consumer-{c}");
                        let pos = if model.log.is_empty() { 0 } else { u64::from(p) % (model.log.len() as u64 + 1) };
                        let got = store.ack_consumer(name.clone(), pos).await.unwrap();
                        let known = model.consumers.get_mut(&name);
                        prop_assert_eq!(got, known.is_some());
                        if let Some(k) = known {
                            *k = (*k).max(pos);
                        }
                    }
                    Op::Read(p) => {
                        let after = if model.log.is_empty() { 0 } else { u64::from(p) % (model.log.len() as u64 + 1) };
                        let got: Vec<String> = store.read_after(after, 1000).await.unwrap().into_iter().map(|e| e.message).collect();
                        let want: Vec<String> = model.log[after.max(model.floor) as usize..].to_vec();
                        prop_assert_eq!(got, want);
                    }
                    Op::Retain(max) => {
                        let future = nodekeeper_common::time::to_unix_ms(std::time::SystemTime::now()) + 60_000;
                        let deleted = store.retain(future, usize::from(max)).await.unwrap();
                        let want = (model.log.len() as u64 - model.floor).min(u64::from(max));
                        prop_assert_eq!(deleted, want);
                        // Identities are remembered while their event is retained: the
                        // deduplication window is the retention.
                        for id in &model.log[model.floor as usize..(model.floor + want) as usize] {
                            model.index.remove(id);
                        }
                        model.floor += want;
                        prop_assert_eq!(store.floor(), model.floor);
                    }
                    Op::Restart => {
                        store.close().await;
                        store = Sqlite::open(dir.path(), StoreOptions::default()).unwrap();
                        prop_assert_eq!(store.head(), model.log.len() as u64);
                        prop_assert_eq!(store.floor(), model.floor);
                        for (name, pos) in &model.consumers {
                            prop_assert_eq!(store.consumer_position(name.clone()).await.unwrap(), Some(*pos));
                        }
                    }
                }
            }
            store.close().await;
            Ok(())
        })?;
    }
}
