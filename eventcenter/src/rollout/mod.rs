//! Rollouts as the center checks and plans them: a spec is valid as a whole or refused with the
//! first problem named (nothing is stored); its waves are planned from the nodes the selector
//! matches when it is created (by name, so the plan is the same on every replica and restart), and
//! how a person's control moves its phase. The controller (`controller`) drives them.

pub mod controller;
pub mod window;

use nodekeeper_proto::v1::{
    Rollout, RolloutControl, RolloutFailureAction, RolloutNode, RolloutNodePhase, RolloutPhase, RolloutSpec, Severity,
};

use crate::store::NewEvent;

/// What the API and the controller share: one change of the rollouts at a time, and a wake-up
/// for the controller when a person created or controlled one.
#[derive(Default)]
pub struct Shared {
    pub lock: tokio::sync::Mutex<()>,
    pub changed: tokio::sync::Notify,
}

/// An event of a rollout's timeline (`node` empty: of the whole rollout; `wave` counted from 1),
/// recorded with who caused it.
pub fn event(
    r: &Rollout,
    kind: &str,
    node: &str,
    wave: Option<u32>,
    message: String,
    severity: Severity,
    by: &str,
) -> NewEvent {
    let spec = r.spec.clone().unwrap_or_default();
    let mut attributes = vec![("rollout", spec.name), ("issuer", by.to_owned())];
    if let Some(w) = wave {
        attributes.push(("wave", w.to_string()));
    }
    NewEvent::center_action("eventcenter/rollouts", &spec.cluster, node, kind, message, severity, attributes)
}

/// "progressing", "rolled back", ...
pub fn phase_name(p: RolloutPhase) -> String {
    p.as_str_name().trim_start_matches("ROLLOUT_PHASE_").to_ascii_lowercase().replace('_', " ")
}

/// A wave's size: a node count, or a percentage of the selected nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    Count(u64),
    Percent(f64),
}

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let s = s.trim();
        let bad = || format!("{s:?}: expected a node count (\"5\") or a percentage (\"25%\")");
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("{s:?}: a percentage must be above 0 and at most 100"));
            }
            Ok(Size::Percent(p))
        } else {
            let n: u64 = s.parse().map_err(|_| bad())?;
            Ok(Size::Count(n))
        }
    }

    /// How many of `total` nodes (a share rounded up, so 1% of 10 nodes is one).
    pub fn of(self, total: u64) -> u64 {
        match self {
            Size::Count(n) => n.min(total),
            Size::Percent(p) => ((p / 100.0) * total as f64).ceil() as u64,
        }
    }
}

/// The checks of a spec that do not need the fleet; the message names the field.
pub fn validate(spec: &RolloutSpec) -> Result<(), String> {
    nodekeeper_common::names::rollout(&spec.name).map_err(|e| e.to_string())?;
    nodekeeper_common::names::cluster(&spec.cluster).map_err(|e| e.to_string())?;
    crate::selector::parse(&spec.selector).map_err(|e| format!("selector: {e}"))?;
    if spec.components.is_empty() {
        return Err("components: a rollout changes at least one component".into());
    }
    let strategy = spec.strategy.clone().unwrap_or_default();
    if strategy.waves.is_empty() {
        return Err("strategy.waves: expected node counts or percentages ending at \"100%\"".into());
    }
    let sizes: Vec<Size> = strategy
        .waves
        .iter()
        .map(|w| Size::parse(w))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("strategy.waves: {e}"))?;
    if sizes.last() != Some(&Size::Percent(100.0)) {
        return Err(format!(
            "strategy.waves: the last wave must be \"100%\", got {:?}",
            strategy.waves.last().unwrap_or(&String::new())
        ));
    }
    for pair in sizes.windows(2) {
        let increasing = match (pair[0], pair[1]) {
            (Size::Count(a), Size::Count(b)) => a < b,
            (Size::Percent(a), Size::Percent(b)) => a < b,
            _ => true,
        };
        if !increasing {
            return Err(format!("strategy.waves: waves must grow: {:?}", strategy.waves));
        }
    }
    if !strategy.failure_budget.is_empty() {
        Size::parse(&strategy.failure_budget).map_err(|e| format!("strategy.failure_budget: {e}"))?;
    }
    if RolloutFailureAction::try_from(strategy.on_failure).is_err() {
        return Err(format!("strategy.on_failure: unknown value {}", strategy.on_failure));
    }
    for (i, w) in strategy.windows.iter().enumerate() {
        let at = |e: String| format!("strategy.windows[{i}]: {e}");
        for d in &w.days {
            if !["mon", "tue", "wed", "thu", "fri", "sat", "sun"].contains(&d.as_str()) {
                return Err(at(format!("day {d:?}: expected mon, tue, wed, thu, fri, sat or sun")));
            }
        }
        window::minutes(&w.start).map_err(|e| at(format!("start: {e}")))?;
        window::minutes(&w.end).map_err(|e| at(format!("end: {e}")))?;
        if w.start == w.end {
            return Err(at("start and end are the same: an empty window".into()));
        }
        if !w.time_zone.is_empty() {
            jiff::tz::TimeZone::get(&w.time_zone).map_err(|e| at(format!("time_zone {:?}: {e}", w.time_zone)))?;
        }
    }
    Ok(())
}

/// The nodes in waves: `nodes` (the selected ones) sorted by name, wave i taking them up to its
/// size (a wave smaller than the one before it takes none).
pub fn plan(spec: &RolloutSpec, mut nodes: Vec<String>) -> Vec<RolloutNode> {
    nodes.sort();
    let total = nodes.len() as u64;
    let waves = spec.strategy.as_ref().map(|s| s.waves.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut taken = 0u64;
    for (i, w) in waves.iter().enumerate() {
        let upto = Size::parse(w).map(|s| s.of(total)).unwrap_or(total).max(taken);
        for node in &nodes[taken as usize..upto as usize] {
            out.push(RolloutNode {
                node: node.clone(),
                wave: i as u32,
                phase: RolloutNodePhase::Waiting as i32,
                ..Default::default()
            });
        }
        taken = upto;
    }
    out
}

/// The phase a person's control moves a rollout to, or why it cannot.
pub fn control(phase: RolloutPhase, control: RolloutControl) -> Result<RolloutPhase, String> {
    use RolloutPhase::*;
    let running = matches!(phase, Pending | Progressing | Waiting);
    let next = match control {
        RolloutControl::Pause if running => Paused,
        RolloutControl::Resume if phase == Paused => Progressing,
        RolloutControl::Abort if running || phase == Paused || phase == Halted => Aborted,
        RolloutControl::Rollback if running || phase == Paused || phase == Halted => RollingBack,
        RolloutControl::Unspecified => return Err("name a control: pause, resume, abort or rollback".into()),
        _ => {
            let name = |n: &str, p: &str| n.trim_start_matches(p).to_ascii_lowercase();
            return Err(format!(
                "the rollout is {}: it cannot {}",
                name(phase.as_str_name(), "ROLLOUT_PHASE_"),
                name(control.as_str_name(), "ROLLOUT_CONTROL_")
            ));
        }
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{ComponentSpec, MaintenanceWindow, RolloutStrategy};

    fn spec(waves: &[&str]) -> RolloutSpec {
        RolloutSpec {
            name: "kubelet-1.31.2".into(),
            cluster: "c1".into(),
            selector: "pool=gpu".into(),
            components: vec![ComponentSpec { name: "kubelet".into(), ..Default::default() }],
            strategy: Some(RolloutStrategy {
                waves: waves.iter().map(|w| w.to_string()).collect(),
                max_parallel: 1,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn waves_must_grow_and_end_at_all_nodes() {
        validate(&spec(&["1", "5%", "25%", "100%"])).unwrap();
        let e = validate(&spec(&["1", "25%"])).unwrap_err();
        assert_eq!(e, "strategy.waves: the last wave must be \"100%\", got \"25%\"");
        let e = validate(&spec(&["5", "2", "100%"])).unwrap_err();
        assert!(e.starts_with("strategy.waves: waves must grow"), "{e}");
        let e = validate(&spec(&["one", "100%"])).unwrap_err();
        assert!(e.starts_with("strategy.waves: \"one\": expected a node count"), "{e}");
        let e = validate(&spec(&["0%", "100%"])).unwrap_err();
        assert!(e.contains("above 0"), "{e}");
        let mut s = spec(&["100%"]);
        s.strategy.as_mut().unwrap().windows.push(MaintenanceWindow {
            days: vec!["sat".into()],
            start: "22:00".into(),
            end: "04:00".into(),
            time_zone: "Mars/Olympus".into(),
        });
        let e = validate(&s).unwrap_err();
        assert!(e.starts_with("strategy.windows[0]: time_zone \"Mars/Olympus\""), "{e}");
    }

    #[test]
    fn nodes_are_planned_in_waves_by_name() {
        let nodes: Vec<String> = (0..20).rev().map(|i| format!("n{i:02}")).collect();
        let plan = plan(&spec(&["1", "25%", "100%"]), nodes);
        let per_wave: Vec<usize> = (0..3).map(|w| plan.iter().filter(|n| n.wave == w).count()).collect();
        assert_eq!(per_wave, [1, 4, 15]);
        assert_eq!(plan[0].node, "n00");
        // A wave no bigger than the one before takes no node.
        let plan = super::plan(&spec(&["2", "5%", "100%"]), vec!["a".into(), "b".into(), "c".into()]);
        let waves: Vec<u32> = plan.iter().map(|n| n.wave).collect();
        assert_eq!(waves, [0, 0, 2]);
    }

    #[test]
    fn controls_move_the_phase_or_say_why_not() {
        use RolloutPhase::*;
        assert_eq!(control(Progressing, RolloutControl::Pause), Ok(Paused));
        assert_eq!(control(Paused, RolloutControl::Resume), Ok(Progressing));
        assert_eq!(control(Halted, RolloutControl::Rollback), Ok(RollingBack));
        assert_eq!(control(Completed, RolloutControl::Abort), Err("the rollout is completed: it cannot abort".into()));
        assert_eq!(
            control(Progressing, RolloutControl::Resume),
            Err("the rollout is progressing: it cannot resume".into())
        );
    }
}
