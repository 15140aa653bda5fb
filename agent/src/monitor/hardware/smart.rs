//! Disk health from SMART, through `smartctl --json` when it is installed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};

use super::{Check, def, status};
use crate::monitor::rules::ConditionDef;
use crate::monitor::{Class, Finding};

/// SMART health of every disk `smartctl --scan` finds.
pub struct Smart {
    smartctl: PathBuf,
    timeout: Duration,
}

impl Smart {
    /// None when smartctl is not installed.
    pub fn new(smartctl: &Path, timeout: Duration) -> Option<Smart> {
        let found = if smartctl.components().count() > 1 {
            smartctl.is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(smartctl).is_file()))
        };
        found.then(|| Smart { smartctl: smartctl.to_owned(), timeout })
    }

    fn run(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut child = std::process::Command::new(&self.smartctl)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        let mut stdout = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            let _ = std::io::Read::read_to_end(&mut stdout, &mut out);
            out
        });
        loop {
            if child.try_wait().ok()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(args = ?args, "smartctl timed out");
                return None;
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
        serde_json::from_slice(&reader.join().ok()?).ok()
    }
}

/// The device names of `smartctl --scan --json`.
pub fn smart_devices(scan: &serde_json::Value) -> Vec<String> {
    scan.get("devices")
        .and_then(|d| d.as_array())
        .map(|a| a.iter().filter_map(|d| d.get("name")?.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Whether `smartctl --json --health DEV` says the disk passed (None: no verdict).
pub fn smart_passed(health: &serde_json::Value) -> Option<bool> {
    health.get("smart_status")?.get("passed")?.as_bool()
}

impl Check for Smart {
    fn name(&self) -> &'static str {
        "smart"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![def("DiskSMARTFailing", "DisksSMARTHealthy", "every disk passes its SMART health check")]
    }

    fn check(&mut self) -> Vec<Finding> {
        let Some(scan) = self.run(&["--scan", "--json"]) else { return Vec::new() };
        let failing: Vec<String> = smart_devices(&scan)
            .into_iter()
            .filter(|dev| self.run(&["--json", "--health", dev]).and_then(|h| smart_passed(&h)) == Some(false))
            .collect();
        let class = Class::new(Severity::Error, Category::Hardware, RecommendedAction::HardwareRepair);
        let d = &self.conditions()[0];
        vec![status(
            d,
            (!failing.is_empty())
                .then(|| ("SMARTHealthFailed", format!("SMART health failed: {}", failing.join(", ")))),
            class,
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smartctl_json() {
        // Output shapes of smartctl 7.3 (`--scan --json`, `--json --health`).
        let scan: serde_json::Value = serde_json::from_str(
            r#"{"json_format_version":[1,0],"smartctl":{"version":[7,3],"exit_status":0},
               "devices":[{"name":"/dev/sda","info_name":"/dev/sda [SAT]","type":"sat","protocol":"ATA"},
                          {"name":"/dev/nvme0","info_name":"/dev/nvme0","type":"nvme","protocol":"NVMe"}]}"#,
        )
        .unwrap();
        assert_eq!(smart_devices(&scan), vec!["/dev/sda", "/dev/nvme0"]);
        let failed: serde_json::Value = serde_json::from_str(
            r#"{"smartctl":{"version":[7,3],"exit_status":8},"device":{"name":"/dev/sda","type":"sat"},"smart_status":{"passed":false}}"#,
        )
        .unwrap();
        assert_eq!(smart_passed(&failed), Some(false));
        assert_eq!(smart_passed(&serde_json::json!({"smartctl": {"exit_status": 2}})), None);
    }
}
