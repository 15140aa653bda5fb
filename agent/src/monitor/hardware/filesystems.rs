//! Filesystems: mounts that should be writable, disk and inode usage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};

use super::{Check, def, status};
use crate::monitor::rules::ConditionDef;
use crate::monitor::{Class, Finding};

pub struct Mounts {
    proc: PathBuf,
    /// Mount points that must be read-write when mounted.
    writable: Vec<String>,
}

impl Mounts {
    pub fn new(proc: &Path, writable: Vec<String>) -> Mounts {
        Mounts { proc: proc.to_owned(), writable }
    }
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl Check for Mounts {
    fn name(&self) -> &'static str {
        "mounts"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![def("ReadonlyMount", "MountsWritable", "file systems that should be writable are")]
    }

    fn check(&mut self) -> Vec<Finding> {
        let Ok(text) = std::fs::read_to_string(self.proc.join("mounts")) else { return Vec::new() };
        // The last mount on a mount point is the visible one.
        let mut opts: HashMap<String, bool> = HashMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 4 {
                opts.insert(unescape_mount(f[1]), f[3].split(',').any(|o| o == "ro"));
            }
        }
        let ro: Vec<&str> =
            self.writable.iter().filter(|m| opts.get(m.as_str()) == Some(&true)).map(String::as_str).collect();
        let class = Class::new(Severity::Critical, Category::Kernel, RecommendedAction::Reboot);
        let d = &self.conditions()[0];
        vec![status(
            d,
            (!ro.is_empty()).then(|| ("MountReadOnly", format!("mounted read-only: {}", ro.join(", ")))),
            class,
        )]
    }
}

// --- disk and inode usage ------------------------------------------------------------------------

pub struct DiskUsage {
    paths: Vec<PathBuf>,
    disk_percent: f64,
    inode_percent: f64,
}

impl DiskUsage {
    pub fn new(paths: Vec<PathBuf>, disk_percent: f64, inode_percent: f64) -> DiskUsage {
        DiskUsage { paths, disk_percent, inode_percent }
    }
}

/// Used percentage as `df` computes it: used / (used + available to unprivileged users).
fn used_percent(total: u64, free: u64, avail: u64) -> Option<f64> {
    let used = total.saturating_sub(free);
    let denom = used + avail;
    (denom > 0).then(|| used as f64 * 100.0 / denom as f64)
}

impl Check for DiskUsage {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![
            def("DiskUsageHigh", "DiskUsageNormal", "disk usage is below its threshold"),
            def("InodeUsageHigh", "InodeUsageNormal", "inode usage is below its threshold"),
        ]
    }

    fn check(&mut self) -> Vec<Finding> {
        let (mut disk, mut inodes) = (Vec::new(), Vec::new());
        let mut checked = 0;
        for p in &self.paths {
            let Ok(s) = nix::sys::statvfs::statvfs(p) else { continue };
            checked += 1;
            if let Some(u) = used_percent(s.blocks(), s.blocks_free(), s.blocks_available())
                && u >= self.disk_percent
            {
                disk.push(format!("{} {u:.0}%", p.display()));
            }
            if let Some(u) = used_percent(s.files(), s.files_free(), s.files_available())
                && s.files() > 0
                && u >= self.inode_percent
            {
                inodes.push(format!("{} {u:.0}%", p.display()));
            }
        }
        if checked == 0 {
            return Vec::new();
        }
        let defs = self.conditions();
        let class = Class::new(Severity::Error, Category::Resource, RecommendedAction::Manual);
        vec![
            status(
                &defs[0],
                (!disk.is_empty()).then(|| {
                    ("DiskUsageHigh", format!("disk usage at or over {}%: {}", self.disk_percent, disk.join(", ")))
                }),
                class,
            ),
            status(
                &defs[1],
                (!inodes.is_empty()).then(|| {
                    ("InodeUsageHigh", format!("inode usage at or over {}%: {}", self.inode_percent, inodes.join(", ")))
                }),
                class,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount("/mnt/my\\040disk"), "/mnt/my disk");
    }

    #[test]
    fn df_percentages() {
        assert_eq!(used_percent(100, 10, 5), Some(90.0 * 100.0 / 95.0));
        assert_eq!(used_percent(0, 0, 0), None);
    }
}
