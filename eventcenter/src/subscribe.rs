//! Subscriptions: stored events after a cursor, then live ones.
//!
//! The live feed is joined *before* the store is read, so nothing committed in between is
//! missed; live events at or below the position already delivered are skipped. When the live
//! feed lags (the subscriber is slower than ingest) or shows a gap, the subscription goes back to
//! reading the store from its position: a slow subscriber is slowed down, never skipped ahead.
//! The position advances over every event examined, matching or not, and idle subscribers get a
//! bookmark with it so that they resume without rescanning.

use std::collections::HashSet;
use std::time::Duration;

use nodekeeper_common::time::now_timestamp;
use nodekeeper_proto::v1::{Bookmark, Event, EventFilter, SubscribeResponse, subscribe_response};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::cursor;
use crate::store::Store;

const PAGE: usize = 1000;

/// An event filter compiled for matching.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    clusters: HashSet<String>,
    nodes: HashSet<String>,
    types: HashSet<String>,
    kinds: HashSet<i32>,
    min_severity: i32,
}

impl Matcher {
    pub fn new(f: Option<&EventFilter>) -> Self {
        let Some(f) = f else { return Self::default() };
        Self {
            clusters: f.clusters.iter().cloned().collect(),
            nodes: f.nodes.iter().cloned().collect(),
            types: f.types.iter().cloned().collect(),
            kinds: f.kinds.iter().copied().collect(),
            min_severity: f.min_severity,
        }
    }

    pub fn matches(&self, e: &Event) -> bool {
        (self.clusters.is_empty() || self.clusters.contains(&e.cluster))
            && (self.nodes.is_empty() || self.nodes.contains(&e.node))
            && (self.types.is_empty() || self.types.contains(&e.r#type))
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && e.severity >= self.min_severity
    }
}

type Tx = mpsc::Sender<Result<SubscribeResponse, Status>>;

pub struct Subscription {
    pub store: Store,
    pub matcher: Matcher,
    /// Position already delivered: events strictly after it are sent.
    pub after: u64,
    pub bookmark_interval: Duration,
    pub cancel: CancellationToken,
}

enum Stop {
    /// The client went away.
    Gone,
    /// End the stream with this status.
    Fail(Status),
}

impl Subscription {
    pub async fn run(self, tx: Tx) {
        let mut live = self.store.subscribe_live();
        let mut pos = self.after;
        let stop = loop {
            if let Err(stop) = self.catch_up(&mut pos, &tx).await {
                break stop;
            }
            match self.follow(&mut live, &mut pos, &tx).await {
                Ok(()) => continue, // lagged or gap: back to the store
                Err(stop) => break stop,
            }
        };
        if let Stop::Fail(status) = stop {
            // The client may be gone already; nothing else to tell.
            let _ = tx.send(Err(status)).await;
        }
    }

    async fn send(&self, tx: &Tx, msg: subscribe_response::Msg) -> Result<(), Stop> {
        tx.send(Ok(SubscribeResponse { msg: Some(msg) })).await.map_err(|_| Stop::Gone)
    }

    async fn catch_up(&self, pos: &mut u64, tx: &Tx) -> Result<(), Stop> {
        loop {
            if *pos < self.store.floor() {
                return Err(Stop::Fail(cursor::expired(*pos, self.store.floor())));
            }
            let page = self
                .store
                .read_after(*pos, PAGE)
                .await
                .map_err(|e| Stop::Fail(Status::unavailable(format!("reading the store: {e}"))))?;
            let n = page.len();
            for event in page {
                let c = event_cursor(&event);
                if self.matcher.matches(&event) {
                    self.send(tx, subscribe_response::Msg::Event(event)).await?;
                }
                *pos = c;
            }
            if n < PAGE {
                return Ok(());
            }
        }
    }

    /// Follows the live feed until it lags or shows a gap (`Ok`), or the stream must stop.
    async fn follow(
        &self,
        live: &mut broadcast::Receiver<crate::store::LiveBatch>,
        pos: &mut u64,
        tx: &Tx,
    ) -> Result<(), Stop> {
        let mut idle_since = Instant::now();
        loop {
            let bookmark_at = idle_since + self.bookmark_interval;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    return Err(Stop::Fail(Status::unavailable("event center is shutting down; resume from your last cursor")));
                }
                _ = tx.closed() => return Err(Stop::Gone),
                batch = live.recv() => match batch {
                    Ok(batch) => {
                        for event in batch.iter() {
                            let c = event_cursor(event);
                            if c <= *pos {
                                continue;
                            }
                            if c != *pos + 1 {
                                return Ok(());
                            }
                            if self.matcher.matches(event) {
                                self.send(tx, subscribe_response::Msg::Event(event.clone())).await?;
                                idle_since = Instant::now();
                            }
                            *pos = c;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, position = *pos, "subscriber lagged behind the live feed; reading the store");
                        return Ok(());
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Stop::Fail(Status::unavailable("event center is shutting down; resume from your last cursor")));
                    }
                },
                _ = tokio::time::sleep_until(bookmark_at) => {
                    let b = Bookmark { cursor: cursor::format(*pos), time: Some(now_timestamp()) };
                    self.send(tx, subscribe_response::Msg::Bookmark(b)).await?;
                    idle_since = Instant::now();
                }
            }
        }
    }
}

fn event_cursor(e: &Event) -> u64 {
    e.cursor.parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{EventKind, Severity};

    #[test]
    fn matcher_requires_every_set_field() {
        let f = EventFilter {
            clusters: vec!["a".into()],
            nodes: vec![],
            types: vec!["X".into(), "Y".into()],
            kinds: vec![],
            min_severity: Severity::Warning as i32,
        };
        let m = Matcher::new(Some(&f));
        let mut e = Event {
            cluster: "a".into(),
            r#type: "Y".into(),
            severity: Severity::Error as i32,
            kind: EventKind::Observation as i32,
            ..Default::default()
        };
        assert!(m.matches(&e));
        e.severity = Severity::Info as i32;
        assert!(!m.matches(&e));
        e.severity = Severity::Error as i32;
        e.cluster = "b".into();
        assert!(!m.matches(&e));
        assert!(Matcher::new(None).matches(&e));
    }
}
