//! `/live`: the center's event stream as server-sent events, filtered to the page's cluster (and
//! node), each event's cursor its SSE id. Pages that open fresh share one center subscription per
//! scope (twenty open pages cost the center one stream); a browser that lost its connection comes
//! back with `Last-Event-ID` and gets a subscription of its own from that cursor, so it misses
//! nothing, like any subscriber. A page only needs to know that something happened; the event's
//! essentials ride along.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as Sse, KeepAlive, Sse as SseResponse};
use axum::response::{IntoResponse, Response};
use nodekeeper_proto::v1::{
    Event, EventFilter, StartPosition, SubscribeRequest, event_service_client::EventServiceClient, subscribe_response,
};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tonic::transport::Channel;

use crate::{Error, Shared};

#[derive(serde::Deserialize, Default, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    node: String,
}

/// An event as a page gets it: (cursor, JSON).
type Item = (String, Arc<str>);

/// The shared subscriptions, by scope.
#[derive(Default, Clone)]
pub struct Hub(Arc<Mutex<HashMap<Scope, broadcast::Sender<Item>>>>);

fn request(s: &Scope, after: &str) -> SubscribeRequest {
    SubscribeRequest {
        after_cursor: after.to_owned(),
        start: if after.is_empty() { StartPosition::Now } else { StartPosition::Unspecified } as i32,
        filter: Some(EventFilter {
            clusters: (!s.cluster.is_empty()).then(|| s.cluster.clone()).into_iter().collect(),
            nodes: (!s.node.is_empty()).then(|| s.node.clone()).into_iter().collect(),
            ..Default::default()
        }),
        bookmark_interval: Some(nodekeeper_common::time::to_duration(Duration::from_secs(5))),
        ..Default::default()
    }
}

fn item(e: Event) -> Item {
    let data = serde_json::json!({
        "type": e.r#type,
        "cluster": e.cluster,
        "node": e.node,
        "fault": e.fault_id,
        "message": e.message,
    });
    (e.cursor, data.to_string().into())
}

fn sse((cursor, data): Item) -> Result<Sse, Infallible> {
    Ok(Sse::default().id(cursor).data(data.as_ref()))
}

impl Hub {
    /// A receiver of the scope's shared subscription, started if none runs.
    async fn join(&self, ch: &Channel, scope: &Scope) -> Result<broadcast::Receiver<Item>, Error> {
        if let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(scope) {
            return Ok(tx.subscribe());
        }
        let mut upstream = EventServiceClient::new(ch.clone()).subscribe(request(scope, "")).await?.into_inner();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(scope) {
            return Ok(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(4096);
        map.insert(scope.clone(), tx.clone());
        drop(map);
        let scope = scope.clone();
        let hub = self.clone();
        tokio::spawn(async move {
            // Ends when the center ends the stream or no page listens any more (seen at the next
            // event or bookmark).
            while let Ok(Some(m)) = upstream.message().await {
                if tx.receiver_count() == 0 {
                    break;
                }
                if let Some(subscribe_response::Msg::Event(e)) = m.msg {
                    let _ = tx.send(item(e));
                }
            }
            let mut map = hub.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&scope).is_some_and(|t| t.same_channel(&tx)) {
                map.remove(&scope);
            }
        });
        Ok(rx)
    }
}

pub async fn stream(State(app): State<Shared>, headers: HeaderMap, Query(s): Query<Scope>) -> Result<Response, Error> {
    let after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let keep = KeepAlive::default();
    if !after.is_empty() {
        let own = EventServiceClient::new(app.ch.clone()).subscribe(request(&s, &after)).await?.into_inner();
        let events = own.filter_map(|m| match m.ok()?.msg {
            Some(subscribe_response::Msg::Event(e)) => Some(sse(item(e))),
            _ => None,
        });
        return Ok(SseResponse::new(events).keep_alive(keep).into_response());
    }
    let rx = app.hub.join(&app.ch, &s).await?;
    // A page too slow to take them loses some wake-ups, never its place: it re-reads the page.
    let events = BroadcastStream::new(rx).filter_map(|r| r.ok().map(sse));
    Ok(SseResponse::new(events).keep_alive(keep).into_response())
}
