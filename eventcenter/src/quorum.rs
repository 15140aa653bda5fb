//! Detector verdicts folded into one: each detector replica reports its own view of a node
//! (AgentDown, KubeletDown, NodeUnreachable: True or False). The views are stored as
//! `DetectorVote` events (evidence; they open no fault); when `quorum` replicas hold a verdict the
//! center records the condition itself, which opens the fault, and clears it when fewer do.
//!
//! Votes are kept in memory: detectors repeat their views every probe round, so a restarted
//! center has them again within a round. The folded state is the stored condition.
//!
//! Replicas on one store: detectors report to whichever replica they hold, so no replica hears
//! every vote itself. There the vote events are only stored, and the leader folds them ([`follow`]):
//! as the head moves it reads the `DetectorVote` events committed since (by any replica; the store
//! marks them, so this reads votes only, not the log), and records the conditions. A new leader
//! starts from the stored conditions and has every detector's view again within a probe round.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use nodekeeper_proto::v1::{Category, Condition, ConditionStatus, Observation, Origin, RecommendedAction, Severity};

use crate::store::{Identity, NewEvent, Store};

/// The condition types detectors report.
pub const VERDICTS: [&str; 3] = ["AgentDown", "KubeletDown", "NodeUnreachable"];

type Key = (String, String, String);
/// Producer → (holds, message).
type Views = BTreeMap<String, (bool, String)>;

/// One detector's view of one verdict about one node.
pub struct Vote<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub verdict: &'a str,
    pub producer: &'a str,
    pub holds: bool,
    pub message: &'a str,
}

#[derive(Default)]
pub struct Quorum {
    /// (cluster, node, verdict) → producer → (holds, message).
    votes: Mutex<HashMap<Key, Views>>,
    /// Verdicts the center has declared (the stored condition is True).
    declared: Mutex<HashMap<Key, bool>>,
}

impl Quorum {
    /// Starts from the conditions the store holds.
    pub fn new(open: impl IntoIterator<Item = (String, String, String)>) -> Quorum {
        let q = Quorum::default();
        let mut d = q.declared.lock().expect("quorum lock");
        for k in open {
            d.insert(k, true);
        }
        drop(d);
        q
    }

    /// Records one detector's view; returns the condition event to store if the folded verdict
    /// changed.
    pub fn vote(&self, v: Vote<'_>, quorum: usize) -> Option<NewEvent> {
        let Vote { cluster, node, verdict, producer, holds, message } = v;
        let key = (cluster.to_owned(), node.to_owned(), verdict.to_owned());
        let mut votes = self.votes.lock().expect("quorum lock");
        let views = votes.entry(key.clone()).or_default();
        views.insert(producer.to_owned(), (holds, message.to_owned()));
        let holding: Vec<(&String, &String)> =
            views.iter().filter(|(_, (h, _))| *h).map(|(p, (_, m))| (p, m)).collect();
        let now = holding.len() >= quorum;
        let mut declared = self.declared.lock().expect("quorum lock");
        let was = declared.get(&key).copied().unwrap_or(false);
        if now == was {
            return None;
        }
        declared.insert(key, now);
        let (status, reason, text) = if now {
            let evidence: Vec<String> = holding.iter().map(|(p, m)| format!("{p}: {m}")).collect();
            (
                ConditionStatus::True,
                verdict.to_owned(),
                format!(
                    "{verdict} confirmed by {} detector(s), quorum {quorum}: {}",
                    holding.len(),
                    evidence.join("; ")
                ),
            )
        } else {
            (
                ConditionStatus::False,
                format!("No{verdict}"),
                format!("{verdict} cleared: {} detector(s) still hold it, quorum {quorum}", holding.len()),
            )
        };
        let (severity, action) = match verdict {
            "NodeUnreachable" => (Severity::Critical, RecommendedAction::Manual),
            "KubeletDown" => (Severity::Error, RecommendedAction::RestartComponent),
            _ => (Severity::Error, RecommendedAction::Manual),
        };
        let now_ts = nodekeeper_common::time::now_timestamp();
        let o = Observation {
            time: Some(now_ts),
            r#type: verdict.to_owned(),
            reason: reason.clone(),
            message: text.clone(),
            severity: severity as i32,
            category: Category::Network as i32,
            action: action as i32,
            condition: Some(Condition {
                r#type: verdict.to_owned(),
                status: status as i32,
                reason,
                message: text,
                last_transition_time: Some(now_ts),
            }),
            source: "eventcenter/detector-quorum".into(),
            ..Default::default()
        };
        let origin = Origin { producer: "center".into(), ..Default::default() };
        Some(NewEvent::new(Identity::Center, crate::api::to_event(cluster, node, o, origin)))
    }
}

/// The vote a stored `DetectorVote` event carries (as `api::report` stores it).
fn stored_vote(e: &nodekeeper_proto::v1::Event) -> Option<Vote<'_>> {
    if e.r#type != crate::store::DETECTOR_VOTE {
        return None;
    }
    Some(Vote {
        cluster: &e.cluster,
        node: &e.node,
        verdict: e.attributes.get("verdict")?,
        producer: &e.origin.as_ref()?.producer,
        holds: e.attributes.get("holds")? == "true",
        message: &e.message,
    })
}

/// The conditions of detector verdicts the store holds as true.
pub async fn open_verdicts(store: &Store) -> Result<Vec<Key>, crate::store::StoreError> {
    Ok(store
        .list_conditions(Vec::new(), Vec::new())
        .await?
        .into_iter()
        .filter_map(|c| {
            let cond = c.condition?;
            (VERDICTS.contains(&cond.r#type.as_str()) && cond.status() == ConditionStatus::True).then_some((
                c.cluster,
                c.node,
                cond.r#type,
            ))
        })
        .collect())
}

/// The leader's fold over every replica's votes (see the module's words), until `cancel`.
pub async fn follow(store: Store, quorum: usize, cancel: tokio_util::sync::CancellationToken) {
    const PAGE: usize = 1000;
    let mut head = store.watch_head();
    // Votes committed before this leader started were folded by the one before (and come again
    // within a probe round).
    let mut pos = *head.borrow_and_update();
    let folded = match open_verdicts(&store).await {
        Ok(open) => Quorum::new(open),
        Err(err) => {
            tracing::error!(error = %err, "detector quorum: cannot read the stored verdicts; not folding votes");
            return;
        }
    };
    loop {
        // Caught up: wait for a commit. Behind (a read failed): try again after the pause below,
        // not only when the next commit comes.
        if pos >= *head.borrow() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = head.changed() => if changed.is_err() { return },
            }
        }
        let upto = *head.borrow_and_update();
        while pos < upto {
            let votes = match store.votes(pos, upto, PAGE).await {
                Ok(votes) => votes,
                Err(err) => {
                    tracing::warn!(error = %err, "detector quorum: cannot read the votes; trying again");
                    break;
                }
            };
            pos = match votes.last() {
                Some(last) if votes.len() == PAGE => last.cursor.parse().unwrap_or(upto),
                _ => upto,
            };
            let conditions: Vec<NewEvent> =
                votes.iter().filter_map(stored_vote).filter_map(|v| folded.vote(v, quorum)).collect();
            if !conditions.is_empty()
                && let Err(err) = store.append(conditions).await
            {
                tracing::error!(error = %err, "detector quorum: cannot record a verdict; it is decided again at the next vote");
            }
        }
        // Reads at most ten times a second however often replicas commit; a vote waits that long.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_needs_the_quorum_and_clears_below_it() {
        let q = Quorum::default();
        let v = |verdict, producer, holds| Vote { cluster: "c", node: "n", verdict, producer, holds, message: "m" };
        assert!(q.vote(v("NodeUnreachable", "det-a", true), 2).is_none(), "one of two");
        let e = q.vote(v("NodeUnreachable", "det-b", true), 2).expect("two of two");
        assert_eq!(e_status(&e), ConditionStatus::True);
        assert!(q.vote(v("NodeUnreachable", "det-b", true), 2).is_none(), "unchanged");
        let e = q.vote(v("NodeUnreachable", "det-a", false), 2).expect("below the quorum");
        assert_eq!(e_status(&e), ConditionStatus::False);
        assert!(q.vote(v("AgentDown", "det-a", false), 2).is_none(), "never declared: nothing to clear");
    }

    fn e_status(e: &NewEvent) -> ConditionStatus {
        e.event.condition.as_ref().unwrap().status()
    }
}
