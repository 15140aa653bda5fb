//! Monitor rule files: node-problem-detector's JSON format (accepted unmodified) and nodekeeper's
//! own TOML format. Both load into a [`MonitorSpec`]: a log monitor (a log source and rules that
//! match its lines) or a custom-plugin monitor (commands run periodically).
//!
//! Every regex is compiled when the file is loaded; a bad file is rejected with its path, the rule
//! and the reason, before anything runs.

mod native;
mod npd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};
use thiserror::Error;

use crate::monitor::Class;

/// The built-in kernel log rules (packaging/rules/kernel-monitor.toml).
pub const DEFAULT_KERNEL_RULES: &str = include_str!("../../../../packaging/rules/kernel-monitor.toml");

#[derive(Debug, Error)]
pub enum RuleError {
    #[error("rule file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("rule file {path}, rule {index} ({reason}): {message}")]
    Rule { path: PathBuf, index: usize, reason: String, message: String },
}

#[derive(Debug, Clone)]
pub enum MonitorSpec {
    Log(LogMonitorSpec),
    Plugin(PluginMonitorSpec),
}

impl MonitorSpec {
    pub fn source(&self) -> &str {
        match self {
            MonitorSpec::Log(l) => &l.source,
            MonitorSpec::Plugin(p) => &p.source,
        }
    }
}

/// Where a log monitor reads its lines.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// /dev/kmsg records, or a file holding them in the same format.
    Kmsg { path: PathBuf },
    /// The systemd journal through `journalctl -o json`, filtered by syslog identifiers and
    /// units. `path`: a journal directory or file (None: the system journal).
    Journal { path: Option<PathBuf>, identifiers: Vec<String>, units: Vec<String> },
    /// A plain text file, followed across rotation. The optional regexes pick each line's
    /// timestamp (in Go's layout `timestamp_format`) and message (the last capture group).
    File { path: PathBuf, timestamp: Option<String>, timestamp_format: Option<String>, message: Option<String> },
}

/// How a condition clears when no check says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clear {
    /// When the node boots again (kernel log conditions: the problem belonged to that boot).
    Reboot,
    /// After this long without a recurrence.
    After(Duration),
    /// Only by a rule that clears it (or an operator).
    Never,
}

/// A condition a monitor may set, with its healthy reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionDef {
    pub kind: String,
    pub reason: String,
    pub message: String,
    pub clear: Clear,
}

#[derive(Debug, Clone)]
pub struct LogRule {
    /// None: temporary (an event); Some: the condition it sets.
    pub condition: Option<String>,
    pub reason: String,
    pub pattern: String,
    /// A permanent rule that clears its condition when it matches.
    pub clears: bool,
    pub class: Class,
}

#[derive(Debug, Clone)]
pub struct LogMonitorSpec {
    pub file: PathBuf,
    pub source: String,
    pub input: Input,
    pub lookback: Duration,
    pub buffer_size: usize,
    /// Lines containing any of these are ignored.
    pub skip: Vec<String>,
    pub conditions: Vec<ConditionDef>,
    pub rules: Vec<LogRule>,
}

#[derive(Debug, Clone)]
pub struct PluginRule {
    pub condition: Option<String>,
    pub reason: String,
    pub path: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
    pub class: Class,
}

#[derive(Debug, Clone)]
pub struct PluginMonitorSpec {
    pub file: PathBuf,
    pub source: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_output_length: usize,
    pub concurrency: usize,
    pub conditions: Vec<ConditionDef>,
    pub rules: Vec<PluginRule>,
}

impl LogMonitorSpec {
    pub fn condition(&self, kind: &str) -> Option<&ConditionDef> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// Loads a rule file: `.json` as node-problem-detector's format, anything else as nodekeeper's TOML.
pub fn load(path: &Path) -> Result<MonitorSpec, RuleError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RuleError::File { path: path.to_owned(), message: format!("cannot read: {e}") })?;
    parse(path, &text)
}

/// Parses rule file text; `path` names it in errors and picks the format (`.json`: NPD's).
pub fn parse(path: &Path, text: &str) -> Result<MonitorSpec, RuleError> {
    if path.extension().is_some_and(|e| e == "json") { npd::parse(path, text) } else { native::parse(path, text) }
}

/// The built-in kernel monitor, reading `kmsg` (normally /dev/kmsg).
pub fn default_kernel_monitor(kmsg: &Path) -> LogMonitorSpec {
    let MonitorSpec::Log(mut spec) = native::parse(Path::new("<built-in kernel-monitor.toml>"), DEFAULT_KERNEL_RULES)
        .expect("the built-in rules are valid (a unit test proves it)")
    else {
        unreachable!("the built-in rules are a log monitor")
    };
    spec.input = Input::Kmsg { path: kmsg.to_owned() };
    spec
}

fn parse_duration(path: &Path, key: &str, s: &str) -> Result<Duration, RuleError> {
    crate::monitor::gotime::parse_go_duration(s).or_else(|| humantime::parse_duration(s).ok()).ok_or_else(|| {
        RuleError::File { path: path.to_owned(), message: format!("{key}: expected a duration like \"5m\", got {s:?}") }
    })
}

fn rule_err(path: &Path, index: usize, reason: &str, message: impl Into<String>) -> RuleError {
    RuleError::Rule { path: path.to_owned(), index: index + 1, reason: reason.to_owned(), message: message.into() }
}

/// Checks a pattern the way the matcher will compile it.
fn check_pattern(path: &Path, index: usize, reason: &str, pattern: &str) -> Result<(), RuleError> {
    if pattern.is_empty() {
        return Err(rule_err(path, index, reason, "empty pattern"));
    }
    crate::monitor::matcher::compile(&crate::monitor::matcher::anchored(pattern))
        .map(|_| ())
        .map_err(|e| rule_err(path, index, reason, format!("bad pattern {pattern:?}: {e}")))
}

fn check_condition(
    path: &Path,
    index: usize,
    reason: &str,
    condition: &str,
    defs: &[ConditionDef],
) -> Result<(), RuleError> {
    if condition.is_empty() {
        return Err(rule_err(path, index, reason, "a permanent rule needs a condition"));
    }
    if !defs.iter().any(|d| d.kind == condition) {
        return Err(rule_err(
            path,
            index,
            reason,
            format!("condition {condition:?} is not declared in \"conditions\""),
        ));
    }
    Ok(())
}

/// The class of a well-known problem (by condition type or reason); others get defaults by kind.
pub fn classify(name: &str, permanent: bool, category: Category) -> Class {
    use Category as C;
    use RecommendedAction as A;
    use Severity as S;
    match name {
        "KernelDeadlock" | "XfsShutdown" | "ReadonlyFilesystem" | "FrequentUnregisterNetDevice" => {
            Class::new(S::Critical, C::Kernel, A::Reboot)
        }
        "CperHardwareErrorFatal" | "UncorrectableMemoryError" => {
            Class::new(S::Critical, C::Hardware, A::HardwareRepair)
        }
        "DiskBadBlock" => Class::new(S::Error, C::Hardware, A::HardwareRepair),
        "CperHardwareErrorCorrected" | "MemoryReadError" => Class::new(S::Warning, C::Hardware, A::None),
        "CperHardwareErrorRecoverable" | "IOError" => Class::new(S::Error, C::Hardware, A::None),
        "OOMKilling" => Class::new(S::Warning, C::Resource, A::None),
        "KubeletUnhealthy" | "FrequentKubeletRestart" | "FrequentDockerRestart" | "FrequentContainerdRestart" => {
            Class::new(S::Error, C::Component, A::RestartComponent)
        }
        "CorruptDockerOverlay2" => Class::new(S::Error, C::Component, A::Manual),
        _ if permanent => Class::new(S::Error, category, A::Manual),
        _ => Class::new(S::Warning, category, A::None),
    }
}

fn check_input(path: &Path, input: &Input) -> Result<(), RuleError> {
    if let Input::File { timestamp, message, timestamp_format, .. } = input {
        for (key, re) in [("timestamp", timestamp), ("message", message)] {
            if let Some(re) = re {
                crate::monitor::matcher::compile(re).map_err(|e| RuleError::File {
                    path: path.to_owned(),
                    message: format!("{key}: bad regex {re:?}: {e}"),
                })?;
            }
        }
        if timestamp.is_some() != timestamp_format.is_some() {
            return Err(RuleError::File {
                path: path.to_owned(),
                message: "timestamp and timestampFormat go together".into(),
            });
        }
    }
    Ok(())
}
