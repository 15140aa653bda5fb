//! node-problem-detector's JSON rule files, accepted unmodified.

use std::path::Path;
use std::time::Duration;

use nodekeeper_proto::v1::Category;
use serde::Deserialize;

use super::*;

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

pub(super) fn parse(path: &Path, text: &str) -> Result<MonitorSpec, RuleError> {
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
