//! Event queries, subscriptions and durable consumers.

use std::pin::Pin;
use std::time::Duration;

use nodekeeper_common::{names, time as nktime};
use nodekeeper_proto::v1::{
    AckConsumerRequest, AckConsumerResponse, DeleteConsumerRequest, DeleteConsumerResponse, GetLogInfoRequest,
    ListConsumersRequest, ListConsumersResponse, ListEventsRequest, ListEventsResponse, LogInfo, StartPosition,
    SubscribeRequest, SubscribeResponse, event_service_server,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Caller, Ctx, READERS, deny, require, scope_clusters, store_status};
use crate::cursor;
use crate::subscribe::{Matcher, Subscription};
use crate::validate;
use nodekeeper_common::tls::Kind;

pub struct EventApi(pub Ctx);

impl EventApi {
    /// The durable consumers the caller may see, with their owners and plain names.
    async fn visible_consumers(&self, caller: &Caller) -> Result<Vec<nodekeeper_proto::v1::Consumer>, Status> {
        let mine = owner(caller);
        let all = self.0.store.list_consumers().await.map_err(store_status)?;
        Ok(all
            .into_iter()
            .filter_map(|mut c| {
                let (owner, name) = crate::store::consumer_parts(&c.name);
                if !may_manage(caller, &mine, owner) {
                    return None;
                }
                (c.owner, c.name) = (owner.to_owned(), name.to_owned());
                Some(c)
            })
            .collect())
    }
}

impl EventApi {
    /// A node's newest events, from its index, scanning back from `before_cursor`.
    async fn newest_first(&self, req: ListEventsRequest) -> Result<ListEventsResponse, Status> {
        let filter = req.filter.clone().unwrap_or_default();
        let ([cluster], [node]) = (filter.clusters.as_slice(), filter.nodes.as_slice()) else {
            return Err(Status::invalid_argument(
                "newest_first: the filter must name exactly one cluster and one node",
            ));
        };
        if !req.after_cursor.is_empty() {
            return Err(Status::invalid_argument("newest_first: scan back with before_cursor, not after_cursor"));
        }
        let mut before = if req.before_cursor.is_empty() { u64::MAX } else { cursor::parse(&req.before_cursor)? };
        let limit = match req.limit as usize {
            0 => 100,
            n => n.min(MAX_LIST),
        };
        let key = crate::store::NodeKey { cluster: cluster.clone(), node: node.clone() };
        let matcher = Matcher::new(Some(&filter));
        let mut events = Vec::new();
        loop {
            let page = self.0.store.node_events_before(key.clone(), before, limit).await.map_err(store_status)?;
            let full = page.len() == limit;
            for e in page {
                before = cursor::parse(&e.cursor)?;
                if matcher.matches(&e) {
                    events.push(e);
                    if events.len() == limit {
                        return Ok(ListEventsResponse {
                            events,
                            next_cursor: cursor::format(before),
                            head_cursor: cursor::format(self.0.store.head()),
                        });
                    }
                }
            }
            if !full {
                return Ok(ListEventsResponse {
                    events,
                    next_cursor: String::new(),
                    head_cursor: cursor::format(self.0.store.head()),
                });
            }
        }
    }
}

/// The owner of the caller's durable consumers: its whole identity, kind, clusters and name, so
/// that a subscriber of one cluster can neither see nor move a consumer of another cluster's
/// subscriber of the same name. "" on an insecure center.
fn owner(caller: &Caller) -> String {
    match caller {
        Some(id) => {
            let mut clusters = id.clusters.clone();
            clusters.sort();
            clusters.dedup();
            format!("{}/{}/{}", id.kind.as_str(), clusters.join(","), id.name)
        }
        None => String::new(),
    }
}

/// The stored key of a durable consumer: `owner:name`. ':' cannot occur in a consumer name.
fn consumer_key(owner: &str, name: &str) -> String {
    if owner.is_empty() { name.to_owned() } else { format!("{owner}:{name}") }
}

/// Whether the caller may see and delete consumers of `owner`: its own, and for an admin every
/// owner whose clusters it covers.
fn may_manage(caller: &Caller, owner_of_caller: &str, owner: &str) -> bool {
    match caller {
        None => true,
        Some(_) if owner == owner_of_caller => true,
        Some(id) if id.kind == Kind::Admin => {
            id.covers("*") || owner.split('/').nth(1).is_some_and(|cs| cs.split(',').all(|c| id.covers(c)))
        }
        Some(_) => false,
    }
}

/// Limits a filter to the clusters the caller may read.
fn scope_filter(caller: &Caller, filter: &mut Option<nodekeeper_proto::v1::EventFilter>) -> Result<(), Status> {
    let f = filter.get_or_insert_with(Default::default);
    f.clusters = scope_clusters(caller, std::mem::take(&mut f.clusters))?;
    Ok(())
}

const MAX_LIST: usize = 10_000;

#[tonic::async_trait]
impl event_service_server::EventService for EventApi {
    async fn list_events(&self, request: Request<ListEventsRequest>) -> Result<Response<ListEventsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "read events")?;
        let mut req = request.into_inner();
        scope_filter(&caller, &mut req.filter)?;
        if req.newest_first {
            return self.newest_first(req).await.map(Response::new);
        }
        let store = &self.0.store;
        let after = cursor::parse(&req.after_cursor)?;
        let floor = store.floor();
        let after = if req.after_cursor.is_empty() {
            floor
        } else if after < floor {
            return Err(cursor::expired(after, floor));
        } else {
            after
        };
        let limit = match req.limit as usize {
            0 => 100,
            n => n.min(MAX_LIST),
        };
        let matcher = Matcher::new(req.filter.as_ref());
        let head = store.head();
        let mut pos = after;
        let mut events = Vec::new();
        // Scan pages until the page limit of matching events is reached or the head is passed.
        'scan: while pos < head {
            let page = store.read_after(pos, 1000).await.map_err(store_status)?;
            if page.is_empty() {
                break;
            }
            for e in page {
                let c = cursor::parse(&e.cursor)?;
                if matcher.matches(&e) {
                    events.push(e);
                }
                pos = c;
                if events.len() >= limit {
                    break 'scan;
                }
            }
        }
        Ok(Response::new(ListEventsResponse {
            events,
            next_cursor: cursor::format(pos),
            head_cursor: cursor::format(head.max(pos)),
        }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "subscribe to events")?;
        let slot = self.0.limits.open_stream(&caller)?;
        let mut req = request.into_inner();
        scope_filter(&caller, &mut req.filter)?;
        let consumer = consumer_key(&owner(&caller), &req.consumer);
        let ctx = &self.0;
        let store = &ctx.store;
        if !req.consumer.is_empty() {
            validate::name(names::consumer(&req.consumer))?;
        }
        let start =
            StartPosition::try_from(req.start).map_err(|_| Status::invalid_argument("unknown start position"))?;
        let mut after = if !req.after_cursor.is_empty() {
            cursor::parse(&req.after_cursor)?
        } else {
            match start {
                StartPosition::Oldest => store.floor(),
                StartPosition::Now => store.head(),
                StartPosition::Unspecified => {
                    let known = if req.consumer.is_empty() {
                        None
                    } else {
                        store.consumer_position(consumer.clone()).await.map_err(store_status)?
                    };
                    known.unwrap_or_else(|| store.head())
                }
            }
        };
        if !req.consumer.is_empty() {
            after = store.ensure_consumer(consumer, after).await.map_err(store_status)?.max(after);
        }
        if after < store.floor() {
            return Err(cursor::expired(after, store.floor()));
        }
        let bookmark_interval = nktime::from_duration(req.bookmark_interval.as_ref())
            .unwrap_or(ctx.config.bookmark_interval)
            .max(Duration::from_millis(100));
        let (tx, rx) = mpsc::channel(1024);
        let sub = Subscription {
            store: store.clone(),
            matcher: Matcher::new(req.filter.as_ref()),
            after,
            bookmark_interval,
            cancel: ctx.cancel.clone(),
        };
        tracing::debug!(consumer = %req.consumer, after, "subscription started");
        tokio::spawn(async move {
            sub.run(tx).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_consumer(
        &self,
        request: Request<AckConsumerRequest>,
    ) -> Result<Response<AckConsumerResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "acknowledge a consumer")?;
        let req = request.into_inner();
        validate::name(names::consumer(&req.consumer))?;
        let c = cursor::parse(&req.cursor)?;
        if c > self.0.store.head() {
            return Err(Status::invalid_argument(format!("cursor {c} is beyond the newest event")));
        }
        if !self.0.store.ack_consumer(consumer_key(&owner(&caller), &req.consumer), c).await.map_err(store_status)? {
            return Err(Status::not_found(format!("no consumer named {}; subscribe with it first", req.consumer)));
        }
        Ok(Response::new(AckConsumerResponse {}))
    }

    async fn list_consumers(
        &self,
        request: Request<ListConsumersRequest>,
    ) -> Result<Response<ListConsumersResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list consumers")?;
        let consumers = self.visible_consumers(&caller).await?;
        Ok(Response::new(ListConsumersResponse { consumers }))
    }

    async fn delete_consumer(
        &self,
        request: Request<DeleteConsumerRequest>,
    ) -> Result<Response<DeleteConsumerResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "delete a consumer")?;
        let req = request.into_inner();
        validate::name(names::consumer(&req.consumer))?;
        let mine = owner(&caller);
        let admin = caller.as_ref().is_some_and(|id| id.kind == Kind::Admin);
        let target = if !req.owner.is_empty() {
            if !may_manage(&caller, &mine, &req.owner) {
                let id = caller.as_ref().expect("only a caller with an identity can be refused");
                return Err(deny(
                    id,
                    format!("{} {} may not delete consumers of {}", id.kind.as_str(), id.name, req.owner),
                ));
            }
            req.owner
        } else if admin {
            // The one consumer of that name the admin may see.
            let owners: Vec<String> = self
                .visible_consumers(&caller)
                .await?
                .into_iter()
                .filter(|c| c.name == req.consumer)
                .map(|c| c.owner)
                .collect();
            match owners.as_slice() {
                [one] => one.clone(),
                [] => return Err(Status::not_found(format!("no consumer named {}", req.consumer))),
                several => {
                    return Err(Status::failed_precondition(format!(
                        "{} consumers are named {} (owners {}); say which with the owner",
                        several.len(),
                        req.consumer,
                        several.join(", ")
                    )));
                }
            }
        } else {
            mine
        };
        if !self.0.store.delete_consumer(consumer_key(&target, &req.consumer)).await.map_err(store_status)? {
            return Err(Status::not_found(format!("no consumer named {}", req.consumer)));
        }
        tracing::info!(consumer = %req.consumer, owner = %target, "durable consumer deleted");
        Ok(Response::new(DeleteConsumerResponse {}))
    }

    async fn get_log_info(&self, request: Request<GetLogInfoRequest>) -> Result<Response<LogInfo>, Status> {
        require(&self.0.caller(&request)?, READERS, "read the log's extent")?;
        let store = &self.0.store;
        Ok(Response::new(LogInfo {
            retention: Some(nktime::to_duration(self.0.config.store.retention)),
            oldest_cursor: cursor::format(store.floor()),
            head_cursor: cursor::format(store.head()),
        }))
    }
}
