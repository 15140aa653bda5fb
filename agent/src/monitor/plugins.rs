//! Custom plugin monitors with node-problem-detector's protocol: each rule's command runs every
//! `interval` (with jitter), under a per-rule timeout and a concurrency limit (per monitor file and
//! for the whole agent). Exit 0: OK; 1: a problem; 2 or anything else (a timeout, a command that
//! cannot run): unknown. Standard output, cut to `max_output_length` characters, is the message.
//!
//! A temporary rule reports an event when its command finds a problem. A permanent rule sets its
//! condition: True on a problem, False (with the condition's healthy reason) when OK, Unknown when
//! unknown.

use std::sync::Arc;

use nodekeeper_proto::v1::ConditionStatus;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Finding;
use super::rules::{PluginMonitorSpec, PluginRule};
use super::state::Reporter;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Problem(String),
    Unknown(String),
}

/// Runs one plugin command.
pub async fn invoke(rule: &PluginRule, max_output: usize) -> Outcome {
    let child = tokio::process::Command::new(&rule.path)
        .args(&rule.args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Outcome::Unknown(format!("cannot run {}: {e}", rule.path.display())),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let run = async {
        let mut out = Vec::new();
        // Read a bounded amount; a chatty plugin cannot make the agent grow.
        let _ = (&mut stdout).take(64 * 1024).read_to_end(&mut out).await;
        let status = child.wait().await;
        (status, out)
    };
    match tokio::time::timeout(rule.timeout, run).await {
        Err(_) => Outcome::Unknown(format!("timeout after {}", humantime::format_duration(rule.timeout))),
        Ok((Err(e), _)) => Outcome::Unknown(format!("cannot wait for {}: {e}", rule.path.display())),
        Ok((Ok(status), out)) => {
            let text: String = String::from_utf8_lossy(&out).trim().chars().take(max_output).collect();
            match status.code() {
                Some(0) => Outcome::Ok(text),
                Some(1) => Outcome::Problem(text),
                _ => Outcome::Unknown(text),
            }
        }
    }
}

/// The finding for a rule's outcome (None: nothing to report).
pub fn finding(spec: &PluginMonitorSpec, rule: &PluginRule, outcome: Outcome) -> Option<Finding> {
    let Some(condition) = &rule.condition else {
        return match outcome {
            Outcome::Problem(msg) => Some(Finding::temporary(&spec.source, &rule.reason, msg, rule.class)),
            _ => None,
        };
    };
    let def = spec.conditions.iter().find(|c| &c.kind == condition);
    let (status, reason, msg) = match outcome {
        Outcome::Problem(msg) => (ConditionStatus::True, rule.reason.clone(), msg),
        Outcome::Unknown(msg) => (ConditionStatus::Unknown, rule.reason.clone(), msg),
        Outcome::Ok(_) => (
            ConditionStatus::False,
            def.map_or_else(|| rule.reason.clone(), |d| d.reason.clone()),
            def.map(|d| d.message.clone()).unwrap_or_default(),
        ),
    };
    Some(Finding::condition(&spec.source, condition, status, &reason, msg, rule.class))
}

/// Runs a plugin monitor until cancelled.
pub async fn run(spec: PluginMonitorSpec, reporter: Reporter, global: Arc<Semaphore>, cancel: CancellationToken) {
    for c in &spec.conditions {
        reporter.declare(c);
    }
    let spec = Arc::new(spec);
    let local = Arc::new(Semaphore::new(spec.concurrency));
    let mut delay = super::first_delay(spec.interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = super::jittered(spec.interval);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..spec.rules.len() {
            let (spec, local, global) = (spec.clone(), local.clone(), global.clone());
            tasks.spawn(async move {
                let _l = local.acquire_owned().await.ok()?;
                let _g = global.acquire_owned().await.ok()?;
                let rule = &spec.rules[i];
                let outcome = invoke(rule, spec.max_output_length).await;
                finding(&spec, rule, outcome)
            });
        }
        let mut findings = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(f)) = r {
                findings.push(f);
            }
        }
        if let Err(err) = reporter.report(findings).await {
            tracing::error!(monitor = %spec.source, error = %err, "cannot store plugin findings");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{Class, rules::Clear, rules::ConditionDef};
    use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};
    use std::path::PathBuf;
    use std::time::Duration;

    fn rule(script: &str, timeout: Duration) -> PluginRule {
        PluginRule {
            condition: None,
            reason: "R".into(),
            path: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            timeout,
            class: Class::new(Severity::Warning, Category::Custom, RecommendedAction::None),
        }
    }

    #[tokio::test]
    async fn exit_codes_output_and_timeouts() {
        let s = Duration::from_secs(5);
        assert_eq!(invoke(&rule("echo fine; exit 0", s), 80).await, Outcome::Ok("fine".into()));
        assert_eq!(invoke(&rule("echo broken; exit 1", s), 80).await, Outcome::Problem("broken".into()));
        assert_eq!(invoke(&rule("echo what; exit 2", s), 80).await, Outcome::Unknown("what".into()));
        assert_eq!(invoke(&rule("echo 1234567890; exit 1", s), 4).await, Outcome::Problem("1234".into()));
        assert!(
            matches!(invoke(&rule("sleep 5", Duration::from_millis(200)), 80).await, Outcome::Unknown(m) if m.contains("timeout"))
        );
        let mut missing = rule("", s);
        missing.path = "/nonexistent/plugin".into();
        assert!(matches!(invoke(&missing, 80).await, Outcome::Unknown(m) if m.contains("cannot run")));
    }

    #[test]
    fn permanent_rules_set_all_three_statuses() {
        let mut r = rule("", Duration::from_secs(1));
        r.condition = Some("NTPProblem".into());
        r.reason = "NTPIsDown".into();
        let spec = PluginMonitorSpec {
            file: "x.json".into(),
            source: "ntp".into(),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            max_output_length: 80,
            concurrency: 1,
            conditions: vec![ConditionDef {
                kind: "NTPProblem".into(),
                reason: "NTPIsUp".into(),
                message: "ntp service is up".into(),
                clear: Clear::Never,
            }],
            rules: vec![r.clone()],
        };
        let st = |o| match finding(&spec, &r, o).unwrap().problem {
            crate::monitor::Problem::Permanent { status, .. } => status,
            _ => unreachable!(),
        };
        assert_eq!(st(Outcome::Problem("down".into())), ConditionStatus::True);
        assert_eq!(st(Outcome::Unknown("?".into())), ConditionStatus::Unknown);
        let ok = finding(&spec, &r, Outcome::Ok(String::new())).unwrap();
        assert_eq!((ok.reason.as_str(), ok.message.as_str()), ("NTPIsUp", "ntp service is up"));
    }
}
