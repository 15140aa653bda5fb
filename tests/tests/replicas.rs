//! Event center replicas (real processes) on one real PostgreSQL 15 (a throwaway cluster per
//! test): permits decided atomically across replicas (two replicas racing for the last slot 1,000
//! times never both grant it); a replica killed with `kill -9` mid-ingest loses nothing it
//! acknowledged, its agents go on with the others and no node is declared lost, the nodes it
//! watched alone are watched by another, and the work that runs once moves to another replica.

use nodekeeper_proto::v1::{
    AcquirePermitRequest, Event, EventFilter, ListEventsRequest, ListPermitsRequest, Operation, ReleasePermitRequest,
    event_service_client::EventServiceClient, permit_service_client::PermitServiceClient,
};
use nodekeeper_tests::EventCenter;
use nodekeeper_tests::postgres::Postgres;
use tonic::transport::Channel;

/// `n` replicas of a center configured with `config` (without a [store] section) on a new
/// database of `pg`.
async fn replicas(pg: &Postgres, n: usize, config: &str) -> Vec<EventCenter> {
    let url = pg.create_database("nodekeeper").await;
    let config = format!("{config}\n[store]\npostgres_url = \"{url}\"\n");
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(EventCenter::start(&config).await);
    }
    out
}

/// Every stored event of type `kind`.
async fn events_of_type(ch: Channel, kind: &str) -> Vec<Event> {
    let mut client = EventServiceClient::new(ch);
    let (mut after, mut out) = (String::new(), Vec::new());
    loop {
        let r = client
            .list_events(ListEventsRequest {
                after_cursor: after,
                filter: Some(EventFilter { types: vec![kind.into()], ..Default::default() }),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("list events")
            .into_inner();
        out.extend(r.events);
        if r.next_cursor == r.head_cursor {
            return out;
        }
        after = r.next_cursor;
    }
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
