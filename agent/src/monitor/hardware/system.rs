//! The system as a whole: pressure-stall information and clock synchronisation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};

use super::{Check, def, status};
use crate::monitor::rules::ConditionDef;
use crate::monitor::{Class, Finding};

/// Thresholds on the 60-second averages (percent of time stalled).
#[derive(Debug, Clone, Copy)]
pub struct PsiThresholds {
    pub cpu_some: f64,
    pub memory_full: f64,
    pub io_full: f64,
}

pub struct Pressure {
    proc: PathBuf,
    t: PsiThresholds,
}

impl Pressure {
    pub fn new(proc: &Path, t: PsiThresholds) -> Pressure {
        Pressure { proc: proc.to_owned(), t }
    }
}

/// The avg60 of the `some` or `full` line of a /proc/pressure file.
pub fn psi_avg60(text: &str, kind: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(kind))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("avg60=")).and_then(|v| v.parse().ok())
}

impl Check for Pressure {
    fn name(&self) -> &'static str {
        "psi"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![
            def("CPUPressureStall", "CPUPressureNormal", "CPU stall time is below its threshold"),
            def("MemoryPressureStall", "MemoryPressureNormal", "memory stall time is below its threshold"),
            def("IOPressureStall", "IOPressureNormal", "I/O stall time is below its threshold"),
        ]
    }

    fn check(&mut self) -> Vec<Finding> {
        let dir = self.proc.join("pressure");
        let mut out = Vec::new();
        let defs = self.conditions();
        for (d, file, kind, limit) in [
            (&defs[0], "cpu", "some", self.t.cpu_some),
            (&defs[1], "memory", "full", self.t.memory_full),
            (&defs[2], "io", "full", self.t.io_full),
        ] {
            let Some(v) = std::fs::read_to_string(dir.join(file)).ok().and_then(|t| psi_avg60(&t, kind)) else {
                continue;
            };
            let class = Class::new(Severity::Warning, Category::Resource, RecommendedAction::None);
            let problem = (v >= limit)
                .then(|| (d.kind.as_str(), format!("{file} {kind} stall avg60 {v:.1}% (threshold {limit}%)")));
            out.push(status(d, problem, class));
        }
        out
    }
}

// --- clock synchronisation -----------------------------------------------------------------------

pub struct Clock {
    max_error: Duration,
}

impl Clock {
    pub fn new(max_error: Duration) -> Clock {
        Clock { max_error }
    }
}

/// What adjtimex(2) says of the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockState {
    /// STA_UNSYNC is set (or the call returned TIME_ERROR).
    pub unsynchronized: bool,
    pub max_error: Duration,
}

/// Reads the kernel's clock discipline state (a read-only adjtimex call).
#[allow(unsafe_code)]
pub fn clock_state() -> Option<ClockState> {
    // SAFETY: `timex` is a plain C struct of integers; all-zero is a valid value and, with
    // `modes` 0, asks the kernel only to fill it in. The pointer is valid for the call.
    let mut tx: nix::libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { nix::libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    Some(ClockState {
        unsynchronized: state == nix::libc::TIME_ERROR || tx.status & nix::libc::STA_UNSYNC != 0,
        max_error: Duration::from_micros(tx.maxerror.max(0) as u64),
    })
}

/// The clock condition for a state.
pub fn clock_finding(s: ClockState, max_error: Duration) -> Finding {
    let d = def("ClockUnsynchronized", "ClockSynchronized", "the clock is synchronised");
    let class = Class::new(Severity::Warning, Category::Kernel, RecommendedAction::Manual);
    let problem = if s.unsynchronized {
        Some(("ClockNotSynchronized", "the kernel reports the clock unsynchronised (no NTP discipline)".to_owned()))
    } else if s.max_error > max_error {
        Some(("ClockErrorTooLarge", format!("estimated clock error {:?} exceeds {:?}", s.max_error, max_error)))
    } else {
        None
    };
    status(&d, problem, class)
}

impl Check for Clock {
    fn name(&self) -> &'static str {
        "clock"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![def("ClockUnsynchronized", "ClockSynchronized", "the clock is synchronised")]
    }

    fn check(&mut self) -> Vec<Finding> {
        clock_state().map(|s| vec![clock_finding(s, self.max_error)]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use nodekeeper_proto::v1::ConditionStatus;

    use super::*;
    use crate::monitor::Problem;

    #[test]
    fn psi_lines() {
        let t = "some avg10=1.50 avg60=12.25 avg300=3.00 total=123\nfull avg10=0.00 avg60=40.10 avg300=0.00 total=9\n";
        assert_eq!(psi_avg60(t, "some"), Some(12.25));
        assert_eq!(psi_avg60(t, "full"), Some(40.10));
    }

    #[test]
    fn clock_decisions() {
        let ok = ClockState { unsynchronized: false, max_error: Duration::from_millis(10) };
        let f = clock_finding(ok, Duration::from_secs(1));
        assert!(matches!(f.problem, Problem::Permanent { status: ConditionStatus::False, .. }));
        let bad = ClockState { unsynchronized: true, max_error: Duration::from_secs(16) };
        assert_eq!(clock_finding(bad, Duration::from_secs(1)).reason, "ClockNotSynchronized");
        let drift = ClockState { unsynchronized: false, max_error: Duration::from_secs(3) };
        assert_eq!(clock_finding(drift, Duration::from_secs(1)).reason, "ClockErrorTooLarge");
        // The real call works here.
        assert!(clock_state().is_some());
    }
}
