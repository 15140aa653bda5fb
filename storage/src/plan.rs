//! One pass over one target, decided without touching anything: what to add, what to remove and
//! why, what waits for its grace, and whether the guard holds the removals back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the syncer remembers of a target between passes and restarts: every entry a node has
/// wanted, by whom and when last. An entry no node wants any more keeps its grace from here, so a
/// restart neither removes early nor forgets.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub entries: BTreeMap<String, Seen>,
    /// When each removal of the guard's window was made (Unix milliseconds): a feed that drops
    /// nodes a few at a time is held like one that drops them at once.
    #[serde(default)]
    pub removed_ms: Vec<u64>,
}

/// A target's rules for a pass.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub grace: Duration,
    pub max_remove_share: f64,
    pub guard_window: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub node: String,
    /// Unix milliseconds.
    pub last_wanted_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub entry: String,
    /// The node it is (or was) of; empty when no node ever had it.
    pub node: String,
    pub why: String,
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub add: Vec<Change>,
    pub remove: Vec<Change>,
    /// Entries no node wants, kept while their grace runs.
    pub waiting: usize,
    /// The guard refused this pass's removals: why.
    pub held: Option<String>,
}

/// The most one pass may remove from a list of `len` entries: `share` of it, at least one.
pub fn allowance(len: usize, share: f64) -> usize {
    ((len as f64 * share).floor() as usize).max(1)
}

/// Decides a pass. `wanted`: entry → node, from the current nodes; `actual`: the target's entries
/// of the kind it manages; `force`: a person let the guard through once. Updates `memory` with
/// what is wanted now, forgets what is neither wanted nor on the target and removals older than
/// the guard's window. The caller notes each removal it makes in `memory.removed_ms`.
pub fn plan(
    wanted: &BTreeMap<String, String>,
    actual: &BTreeSet<String>,
    memory: &mut Memory,
    rules: Rules,
    now_ms: u64,
    force: bool,
) -> Plan {
    let grace = rules.grace;
    let mut p = Plan::default();
    for (entry, node) in wanted {
        let known = memory.entries.contains_key(entry);
        memory.entries.insert(entry.clone(), Seen { node: node.clone(), last_wanted_ms: now_ms });
        if !actual.contains(entry) {
            let why = if known {
                format!("wanted by node {node} and missing on the target")
            } else {
                format!("node {node} registered with it or changed to it")
            };
            p.add.push(Change { entry: entry.clone(), node: node.clone(), why });
        }
    }
    for entry in actual.iter().filter(|e| !wanted.contains_key(*e)) {
        match memory.entries.get(entry) {
            Some(seen) if now_ms.saturating_sub(seen.last_wanted_ms) < grace.as_millis() as u64 => p.waiting += 1,
            Some(seen) => p.remove.push(Change {
                entry: entry.clone(),
                node: seen.node.clone(),
                why: format!(
                    "node {} has not had it for {} (decommissioned, replaced or no longer selected)",
                    seen.node,
                    humantime::format_duration(grace)
                ),
            }),
            None => p.remove.push(Change {
                entry: entry.clone(),
                node: String::new(),
                why: "no node of the cluster has it (an edit on the target)".into(),
            }),
        }
    }
    memory.entries.retain(|e, _| wanted.contains_key(e) || actual.contains(e));
    let window = rules.guard_window.as_millis() as u64;
    memory.removed_ms.retain(|t| now_ms.saturating_sub(*t) < window);
    // Measured against the list as it was before the window's removals.
    let recent = memory.removed_ms.len();
    let allowed = allowance(actual.len() + recent, rules.max_remove_share);
    if recent + p.remove.len() > allowed && !force {
        p.held = Some(format!(
            "would remove {} of the list's {} entries within {} ({recent} removed already), more than the {allowed} allowed (max_remove_share {})",
            p.remove.len() + recent,
            actual.len() + recent,
            humantime::format_duration(rules.guard_window),
            rules.max_remove_share
        ));
        p.remove.clear();
    }
    if force {
        memory.removed_ms.clear();
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);
    const RULES: Rules = Rules { grace: GRACE, max_remove_share: 0.5, guard_window: Duration::from_secs(600) };

    fn wanted(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(e, n)| ((*e).to_owned(), (*n).to_owned())).collect()
    }

    fn set(entries: &[&str]) -> BTreeSet<String> {
        entries.iter().map(|e| (*e).to_owned()).collect()
    }

    fn entries(c: &[Change]) -> Vec<&str> {
        c.iter().map(|c| c.entry.as_str()).collect()
    }

    #[test]
    fn new_entries_are_added_and_an_unwanted_one_is_removed_only_after_its_grace() {
        let mut m = Memory::default();
        let p = plan(&wanted(&[("a1", "a"), ("b1", "b")]), &set(&["b1"]), &mut m, RULES, 1_000, false);
        assert_eq!(entries(&p.add), ["a1"]);
        assert!(p.add[0].why.contains("registered"));
        assert!(p.remove.is_empty());
        // Node a is replaced: a2 in, a1 waits for its grace, then goes.
        let now = wanted(&[("a2", "a"), ("b1", "b")]);
        let p = plan(&now, &set(&["a1", "b1"]), &mut m, RULES, 2_000, false);
        assert_eq!(entries(&p.add), ["a2"]);
        assert_eq!((p.waiting, p.remove.len()), (1, 0));
        let p = plan(&now, &set(&["a1", "a2", "b1"]), &mut m, RULES, 1_000 + 59_999, false);
        assert_eq!((p.waiting, p.remove.len()), (1, 0));
        let p = plan(&now, &set(&["a1", "a2", "b1"]), &mut m, RULES, 61_000, false);
        assert_eq!(entries(&p.remove), ["a1"]);
        assert_eq!(p.remove[0].node, "a");
        // Removed: forgotten.
        plan(&now, &set(&["a2", "b1"]), &mut m, RULES, 62_000, false);
        assert_eq!(m.entries.keys().collect::<Vec<_>>(), ["a2", "b1"]);
    }

    #[test]
    fn drift_is_repaired_in_one_pass_both_ways() {
        let mut m = Memory::default();
        let w = wanted(&[("a1", "a"), ("b1", "b"), ("c1", "c")]);
        plan(&w, &set(&["a1", "b1", "c1"]), &mut m, RULES, 1_000, false);
        // Someone removed b1 and added x on the target.
        let p = plan(&w, &set(&["a1", "c1", "x"]), &mut m, RULES, 2_000, false);
        assert_eq!(entries(&p.add), ["b1"]);
        assert!(p.add[0].why.contains("missing on the target"));
        assert_eq!(entries(&p.remove), ["x"]);
        assert_eq!(p.remove[0].node, "");
    }

    #[test]
    fn the_guard_holds_back_more_than_the_share_unless_forced() {
        let all = ["a", "b", "c", "d", "e"];
        let mut m = Memory::default();
        let w: BTreeMap<_, _> = all.iter().map(|e| ((*e).to_owned(), (*e).to_owned())).collect();
        plan(&w, &set(&all), &mut m, RULES, 0, false);
        // A broken feed: 3 of 5 (60 %) gone.
        let few = wanted(&[("a", "a"), ("b", "b")]);
        let p = plan(&few, &set(&all), &mut m, RULES, 120_000, false);
        assert!(p.remove.is_empty());
        let held = p.held.unwrap();
        assert!(held.contains("would remove 3 of the list's 5 entries within 10m (0 removed already)"), "{held}");
        let p = plan(&few, &set(&all), &mut m, RULES, 121_000, true);
        assert_eq!(entries(&p.remove), ["c", "d", "e"]);
        assert_eq!(p.held, None);
        // Two of five is within the share.
        let mut m2 = Memory::default();
        let p = plan(&wanted(&[("a", "a"), ("b", "b"), ("c", "c")]), &set(&all), &mut m2, RULES, 0, false);
        assert_eq!(p.remove.len(), 2);
        assert_eq!(allowance(1, 0.5), 1);
        assert_eq!(allowance(0, 0.5), 1);
    }

    #[test]
    fn a_feed_that_drops_nodes_a_few_at_a_time_is_held_within_the_window() {
        let all = ["a", "b", "c", "d", "e"];
        let mut m = Memory::default();
        let w: BTreeMap<_, _> = all.iter().map(|e| ((*e).to_owned(), (*e).to_owned())).collect();
        plan(&w, &set(&all), &mut m, RULES, 0, false);
        // Two go (within the share), and are removed.
        let p = plan(&wanted(&[("a", "a"), ("b", "b"), ("c", "c")]), &set(&all), &mut m, RULES, 70_000, false);
        assert_eq!(entries(&p.remove), ["d", "e"]);
        m.removed_ms.extend([70_000, 70_000]);
        // One more within the window: 3 of the 5 the list had.
        let p = plan(&wanted(&[("a", "a"), ("b", "b")]), &set(&["a", "b", "c"]), &mut m, RULES, 140_000, false);
        assert!(p.remove.is_empty());
        assert!(p.held.unwrap().contains("would remove 3 of the list's 5 entries within 10m (2 removed already)"));
        // Past the window, one of three is within the share again.
        let p = plan(&wanted(&[("a", "a"), ("b", "b")]), &set(&["a", "b", "c"]), &mut m, RULES, 670_001, false);
        assert_eq!(entries(&p.remove), ["c"]);
        assert!(m.removed_ms.is_empty());
    }
}
