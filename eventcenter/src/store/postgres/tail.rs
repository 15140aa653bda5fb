//! A replica's live feed: every event any replica commits, in cursor order. One task per replica
//! follows the head (its own commits and the others' notifications) and reads what is new from the
//! table, so subscribers on any replica see every event soon after its commit; a subscriber that
//! lags or sees a gap goes back to the table (`crate::subscribe`), as on SQLite. While nobody on
//! the replica follows the feed it reads nothing (with many replicas, most have no subscriber).

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::store::LiveBatch;

const PAGE: usize = 1000;

/// Follows `head` from `from`, broadcasting what is committed after it. Ends when the store's
/// head sender is gone.
pub(super) async fn follow(
    pool: deadpool_postgres::Pool,
    mut head: watch::Receiver<u64>,
    live: broadcast::Sender<LiveBatch>,
    from: u64,
) {
    let mut pos = from;
    loop {
        while pos < *head.borrow() {
            // Nobody follows: nothing to read. Whoever subscribes later reads the table up to
            // where the feed then is (a gap sends a subscriber back to the table anyway).
            if live.receiver_count() == 0 {
                pos = *head.borrow();
                break;
            }
            match super::read::read_after(&pool, pos, PAGE).await {
                Ok(page) if !page.is_empty() => {
                    pos = page.last().and_then(|e| e.cursor.parse().ok()).unwrap_or(pos);
                    // Nobody listening is fine.
                    let _ = live.send(Arc::new(page));
                }
                // Retention removed what was after `pos`; readers go back to the store anyway.
                Ok(_) => pos = *head.borrow(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the log for the live feed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}
