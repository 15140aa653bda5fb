//! Monitor rule files: node-problem-detector's JSON format (accepted unmodified) and nodekeeper's
//! own TOML format. Both load into a [`MonitorSpec`]: a log monitor (a log source and rules that
//! match its lines) or a custom-plugin monitor (commands run periodically).
//!
//! Every regex is compiled when the file is loaded; a bad file is rejected with its path, the rule
//! and the reason, before anything runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};
use serde::Deserialize;
use thiserror::Error;

use super::{ActionName, CategoryName, Class, SeverityName};

/// The built-in kernel log rules (packaging/rules/kernel-monitor.toml).
pub const DEFAULT_KERNEL_RULES: &str = include_str!("../../../packaging/rules/kernel-monitor.toml");

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
    if path.extension().is_some_and(|e| e == "json") { parse_npd(path, text) } else { parse_toml(path, text) }
}

/// The built-in kernel monitor, reading `kmsg` (normally /dev/kmsg).
pub fn default_kernel_monitor(kmsg: &Path) -> LogMonitorSpec {
    let MonitorSpec::Log(mut spec) = parse_toml(Path::new("<built-in kernel-monitor.toml>"), DEFAULT_KERNEL_RULES)
        .expect("the built-in rules are valid (a unit test proves it)")
    else {
        unreachable!("the built-in rules are a log monitor")
    };
    spec.input = Input::Kmsg { path: kmsg.to_owned() };
    spec
}

fn parse_duration(path: &Path, key: &str, s: &str) -> Result<Duration, RuleError> {
    super::gotime::parse_go_duration(s).or_else(|| humantime::parse_duration(s).ok()).ok_or_else(|| RuleError::File {
        path: path.to_owned(),
        message: format!("{key}: expected a duration like \"5m\", got {s:?}"),
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
    super::matcher::compile(&super::matcher::anchored(pattern))
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

// --- node-problem-detector's JSON format -------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NpdFile {
    plugin: String,
    #[serde(default)]
    plugin_config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    log_path: String,
    #[serde(default)]
    lookback: String,
    #[serde(default)]
    buffer_size: usize,
    source: String,
    #[serde(default)]
    skip_list: Vec<String>,
    #[serde(default)]
    conditions: Vec<NpdCondition>,
    #[serde(default)]
    rules: Vec<NpdRule>,
}

#[derive(Debug, Deserialize)]
struct NpdCondition {
    #[serde(rename = "type")]
    kind: String,
    reason: String,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct NpdRule {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    condition: String,
    reason: String,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    timeout: String,
}

fn npd_string(
    path: &Path,
    config: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<String>, RuleError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(RuleError::File {
            path: path.to_owned(),
            message: format!("pluginConfig.{key}: expected a string, got {other}"),
        }),
    }
}

fn npd_number(
    path: &Path,
    config: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    default: usize,
) -> Result<usize, RuleError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| RuleError::File {
            path: path.to_owned(),
            message: format!("pluginConfig.{key}: expected a non-negative integer, got {v}"),
        }),
    }
}

fn npd_permanent(path: &Path, index: usize, rule: &NpdRule) -> Result<bool, RuleError> {
    match rule.kind.as_str() {
        "temporary" => Ok(false),
        "permanent" => Ok(true),
        other => Err(rule_err(
            path,
            index,
            &rule.reason,
            format!("unknown type {other:?}: expected \"temporary\" or \"permanent\""),
        )),
    }
}

fn parse_npd(path: &Path, text: &str) -> Result<MonitorSpec, RuleError> {
    let f: NpdFile =
        serde_json::from_str(text).map_err(|e| RuleError::File { path: path.to_owned(), message: e.to_string() })?;
    let (category, clear) = match f.plugin.as_str() {
        "kmsg" | "filelog" => (Category::Kernel, Clear::Reboot),
        "journald" => (Category::Component, Clear::Reboot),
        "custom" => (Category::Custom, Clear::Never),
        other => {
            return Err(RuleError::File {
                path: path.to_owned(),
                message: format!("plugin: unknown plugin {other:?}: expected kmsg, journald, filelog or custom"),
            });
        }
    };
    let conditions: Vec<ConditionDef> = f
        .conditions
        .iter()
        .map(|c| ConditionDef { kind: c.kind.clone(), reason: c.reason.clone(), message: c.message.clone(), clear })
        .collect();
    if f.plugin == "custom" {
        let interval = parse_duration(
            path,
            "pluginConfig.invoke_interval",
            npd_string(path, &f.plugin_config, "invoke_interval")?.as_deref().unwrap_or("30s"),
        )?;
        let timeout = parse_duration(
            path,
            "pluginConfig.timeout",
            npd_string(path, &f.plugin_config, "timeout")?.as_deref().unwrap_or("5s"),
        )?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rules = Vec::new();
        for (i, r) in f.rules.iter().enumerate() {
            let permanent = npd_permanent(path, i, r)?;
            if permanent {
                check_condition(path, i, &r.reason, &r.condition, &conditions)?;
            }
            if r.path.is_empty() {
                return Err(rule_err(path, i, &r.reason, "a custom plugin rule needs a path"));
            }
            let rule_timeout =
                if r.timeout.is_empty() { timeout } else { parse_duration(path, "timeout", &r.timeout)? };
            let name = if permanent { r.condition.as_str() } else { r.reason.as_str() };
            rules.push(PluginRule {
                condition: permanent.then(|| r.condition.clone()),
                reason: r.reason.clone(),
                path: base.join(&r.path),
                args: r.args.clone(),
                timeout: rule_timeout,
                class: classify(name, permanent, category),
            });
        }
        return Ok(MonitorSpec::Plugin(PluginMonitorSpec {
            file: path.to_owned(),
            source: f.source,
            interval,
            timeout,
            max_output_length: npd_number(path, &f.plugin_config, "max_output_length", 80)?,
            concurrency: npd_number(path, &f.plugin_config, "concurrency", 3)?.max(1),
            conditions,
            rules,
        }));
    }
    let input = match f.plugin.as_str() {
        "kmsg" => Input::Kmsg { path: PathBuf::from(if f.log_path.is_empty() { "/dev/kmsg" } else { &f.log_path }) },
        "journald" => Input::Journal {
            path: (!f.log_path.is_empty()).then(|| PathBuf::from(&f.log_path)),
            identifiers: npd_string(path, &f.plugin_config, "source")?.into_iter().collect(),
            units: Vec::new(),
        },
        _ => {
            if f.log_path.is_empty() {
                return Err(RuleError::File {
                    path: path.to_owned(),
                    message: "logPath: a filelog monitor needs a log file".into(),
                });
            }
            Input::File {
                path: PathBuf::from(&f.log_path),
                timestamp: npd_string(path, &f.plugin_config, "timestamp")?,
                timestamp_format: npd_string(path, &f.plugin_config, "timestampFormat")?,
                message: npd_string(path, &f.plugin_config, "message")?,
            }
        }
    };
    let mut rules = Vec::new();
    for (i, r) in f.rules.iter().enumerate() {
        let permanent = npd_permanent(path, i, r)?;
        if permanent {
            check_condition(path, i, &r.reason, &r.condition, &conditions)?;
        }
        check_pattern(path, i, &r.reason, &r.pattern)?;
        let name = if permanent { r.condition.as_str() } else { r.reason.as_str() };
        rules.push(LogRule {
            condition: permanent.then(|| r.condition.clone()),
            reason: r.reason.clone(),
            pattern: r.pattern.clone(),
            clears: false,
            class: classify(name, permanent, category),
        });
    }
    let spec = LogMonitorSpec {
        file: path.to_owned(),
        source: f.source,
        input,
        lookback: if f.lookback.is_empty() { Duration::ZERO } else { parse_duration(path, "lookback", &f.lookback)? },
        buffer_size: f.buffer_size.max(1),
        skip: f.skip_list,
        conditions,
        rules,
    };
    check_input(path, &spec.input)?;
    Ok(MonitorSpec::Log(spec))
}

fn check_input(path: &Path, input: &Input) -> Result<(), RuleError> {
    if let Input::File { timestamp, message, timestamp_format, .. } = input {
        for (key, re) in [("timestamp", timestamp), ("message", message)] {
            if let Some(re) = re {
                super::matcher::compile(re).map_err(|e| RuleError::File {
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

// --- nodekeeper's TOML format ------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    source: String,
    log: Option<TomlLog>,
    plugin: Option<TomlPlugin>,
    #[serde(default)]
    conditions: Vec<TomlCondition>,
    #[serde(default)]
    rules: Vec<TomlRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlLog {
    /// kmsg, journal or file.
    kind: String,
    path: Option<PathBuf>,
    #[serde(default = "default_lookback", with = "nodekeeper_common::config::duration")]
    lookback: Duration,
    #[serde(default = "default_buffer")]
    buffer_lines: usize,
    #[serde(default)]
    identifiers: Vec<String>,
    #[serde(default)]
    units: Vec<String>,
    timestamp: Option<String>,
    timestamp_format: Option<String>,
    message: Option<String>,
    #[serde(default)]
    skip: Vec<String>,
}

fn default_lookback() -> Duration {
    Duration::from_secs(300)
}

fn default_buffer() -> usize {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlPlugin {
    #[serde(with = "nodekeeper_common::config::duration")]
    interval: Duration,
    #[serde(with = "nodekeeper_common::config::duration")]
    timeout: Duration,
    #[serde(default = "default_output")]
    max_output_length: usize,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
}

fn default_output() -> usize {
    80
}

fn default_concurrency() -> usize {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlCondition {
    #[serde(rename = "type")]
    kind: String,
    reason: String,
    #[serde(default)]
    message: String,
    /// "reboot", "never", or a duration without recurrence ("1h").
    #[serde(default)]
    clear: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlRule {
    #[serde(rename = "type")]
    kind: String,
    reason: String,
    condition: Option<String>,
    pattern: Option<String>,
    #[serde(default)]
    clears: bool,
    path: Option<PathBuf>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default, with = "nodekeeper_common::config::duration::option")]
    timeout: Option<Duration>,
    severity: Option<SeverityName>,
    category: Option<CategoryName>,
    action: Option<ActionName>,
}

fn parse_toml(path: &Path, text: &str) -> Result<MonitorSpec, RuleError> {
    let f: TomlFile = nodekeeper_common::config::parse(path, text)
        .map_err(|e| RuleError::File { path: path.to_owned(), message: e.to_string() })?;
    let file_err = |message: String| RuleError::File { path: path.to_owned(), message };
    let (category, default_clear) = match (&f.log, &f.plugin) {
        (Some(l), None) if l.kind == "kmsg" => (Category::Kernel, Clear::Reboot),
        (Some(_), None) => (Category::Component, Clear::Reboot),
        (None, Some(_)) => (Category::Custom, Clear::Never),
        _ => return Err(file_err("expected exactly one of [log] and [plugin]".into())),
    };
    let mut conditions = Vec::new();
    for c in &f.conditions {
        let clear = match c.clear.as_deref() {
            None => default_clear,
            Some("reboot") => Clear::Reboot,
            Some("never") => Clear::Never,
            Some(d) => Clear::After(humantime::parse_duration(d).map_err(|_| {
                file_err(format!(
                    "conditions {:?}: clear: expected \"reboot\", \"never\" or a duration, got {d:?}",
                    c.kind
                ))
            })?),
        };
        conditions.push(ConditionDef {
            kind: c.kind.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            clear,
        });
    }
    let class_of = |i: usize, r: &TomlRule, permanent: bool| -> Result<Class, RuleError> {
        let name = if permanent { r.condition.as_deref().unwrap_or("") } else { &r.reason };
        let mut class = classify(name, permanent, category);
        if let Some(s) = r.severity {
            class.severity = s.into();
        }
        if let Some(c) = r.category {
            class.category = c.into();
        }
        if let Some(a) = r.action {
            class.action = a.into();
        }
        if r.clears && !permanent {
            return Err(rule_err(path, i, &r.reason, "only a permanent rule can clear a condition"));
        }
        Ok(class)
    };
    let permanent = |i: usize, r: &TomlRule| -> Result<bool, RuleError> {
        let p = match r.kind.as_str() {
            "temporary" => false,
            "permanent" => true,
            other => {
                return Err(rule_err(
                    path,
                    i,
                    &r.reason,
                    format!("unknown type {other:?}: expected \"temporary\" or \"permanent\""),
                ));
            }
        };
        if p {
            check_condition(path, i, &r.reason, r.condition.as_deref().unwrap_or(""), &conditions)?;
        }
        Ok(p)
    };
    if let Some(p) = &f.plugin {
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rules = Vec::new();
        for (i, r) in f.rules.iter().enumerate() {
            let perm = permanent(i, r)?;
            let exe = r.path.as_ref().ok_or_else(|| rule_err(path, i, &r.reason, "a plugin rule needs a path"))?;
            rules.push(PluginRule {
                condition: if perm { r.condition.clone() } else { None },
                reason: r.reason.clone(),
                path: base.join(exe),
                args: r.args.clone(),
                timeout: r.timeout.unwrap_or(p.timeout),
                class: class_of(i, r, perm)?,
            });
        }
        return Ok(MonitorSpec::Plugin(PluginMonitorSpec {
            file: path.to_owned(),
            source: f.source,
            interval: p.interval,
            timeout: p.timeout,
            max_output_length: p.max_output_length,
            concurrency: p.concurrency.max(1),
            conditions,
            rules,
        }));
    }
    let l = f.log.as_ref().expect("checked above");
    let input = match l.kind.as_str() {
        "kmsg" => Input::Kmsg { path: l.path.clone().unwrap_or_else(|| "/dev/kmsg".into()) },
        "journal" => {
            Input::Journal { path: l.path.clone(), identifiers: l.identifiers.clone(), units: l.units.clone() }
        }
        "file" => Input::File {
            path: l.path.clone().ok_or_else(|| file_err("log.path: a file monitor needs a path".into()))?,
            timestamp: l.timestamp.clone(),
            timestamp_format: l.timestamp_format.clone(),
            message: l.message.clone(),
        },
        other => return Err(file_err(format!("log.kind: unknown kind {other:?}: expected kmsg, journal or file"))),
    };
    check_input(path, &input)?;
    let mut rules = Vec::new();
    for (i, r) in f.rules.iter().enumerate() {
        let perm = permanent(i, r)?;
        let pattern = r.pattern.clone().unwrap_or_default();
        check_pattern(path, i, &r.reason, &pattern)?;
        rules.push(LogRule {
            condition: if perm { r.condition.clone() } else { None },
            reason: r.reason.clone(),
            pattern,
            clears: r.clears,
            class: class_of(i, r, perm)?,
        });
    }
    if l.buffer_lines == 0 {
        return Err(file_err("log.buffer_lines must be at least 1".into()));
    }
    Ok(MonitorSpec::Log(LogMonitorSpec {
        file: path.to_owned(),
        source: f.source,
        input,
        lookback: l.lookback,
        buffer_size: l.buffer_lines,
        skip: l.skip.clone(),
        conditions,
        rules,
    }))
}
