//! Hardware and resource checks, each reading from a configurable root (`paths.sys`,
//! `paths.proc`) so that tests run them on fixture trees in the kernel's formats:
//!
//! - EDAC memory controllers: correctable errors (events), uncorrectable ones (a condition);
//! - CPU thermal throttling counters (events);
//! - NIC carrier state (a condition for links down) and carrier changes (a condition for flaps);
//! - mounts that should be read-write but are read-only (/proc/mounts);
//! - disk and inode usage (statvfs);
//! - pressure-stall information (/proc/pressure);
//! - clock synchronisation (adjtimex);
//! - SMART health via `smartctl --json`, when smartctl is installed.
//!
//! Each check returns the full status of its conditions every time; the reporter turns that into
//! transitions, so a check that passes again clears its condition.

mod filesystems;
mod smart;
mod sysfs;
mod system;

pub use filesystems::{DiskUsage, Mounts};
pub use smart::Smart;
pub use sysfs::{Edac, Nics, Thermal};
pub use system::{Clock, ClockState, Pressure, PsiThresholds, clock_finding, clock_state, psi_avg60};

use std::path::{Path, PathBuf};

use nodekeeper_proto::v1::ConditionStatus;

use super::rules::{Clear, ConditionDef};
use super::{Class, Finding};

/// A periodic check that runs on the blocking pool.
pub trait Check: Send + 'static {
    fn name(&self) -> &'static str;
    /// The conditions it sets, with their healthy reason and message.
    fn conditions(&self) -> Vec<ConditionDef>;
    fn check(&mut self) -> Vec<Finding>;
}

const SOURCE: &str = "hardware-monitor";

fn def(kind: &str, reason: &str, message: &str) -> ConditionDef {
    ConditionDef { kind: kind.into(), reason: reason.into(), message: message.into(), clear: Clear::Never }
}

/// The finding for a condition: `problem` Some((reason, message)) when present, else healthy.
fn status(d: &ConditionDef, problem: Option<(&str, String)>, class: Class) -> Finding {
    match problem {
        Some((reason, message)) => Finding::condition(SOURCE, &d.kind, ConditionStatus::True, reason, message, class),
        None => Finding::condition(SOURCE, &d.kind, ConditionStatus::False, &d.reason, d.message.clone(), class),
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}

/// Entries of a directory whose names start with `prefix`, sorted.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).map(|e| e.path()).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
