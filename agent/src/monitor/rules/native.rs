//! nodekeeper's own TOML rule files.

use std::path::Path;
use std::time::Duration;

use nodekeeper_proto::v1::Category;
use serde::Deserialize;

use super::*;
use crate::monitor::{ActionName, CategoryName, Class, SeverityName};

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

pub(super) fn parse(path: &Path, text: &str) -> Result<MonitorSpec, RuleError> {
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
