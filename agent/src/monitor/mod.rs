//! Health monitors: what they find and how it reaches the center.
//!
//! A monitor produces [`Finding`]s. A *temporary* finding is an event; a *permanent* one sets a
//! condition (True, False or Unknown). [`state::Conditions`] keeps each condition's state in the
//! outbox database, in the same transaction as the observation that changes it, so a restart of
//! the agent neither forgets an open condition nor reports it again, and nothing is reported
//! healthy before a check has run.
//!
//! The monitors: rule-matched logs (`logs`, rules from `rules`, matched by `matcher`), hardware and
//! resources (`hardware`), components (`components`), and custom plugins (`plugins`).

pub mod components;
pub mod gotime;
pub mod hardware;
pub mod logs;
pub mod matcher;
pub mod plugins;
pub mod rules;
pub mod state;

use std::time::Duration;

use nodekeeper_proto::v1::{Category, ConditionStatus, RecommendedAction, Severity};
use rand::RngExt;
use serde::Deserialize;

/// A temporary problem (an event) or a permanent one (a condition's new status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Temporary,
    Permanent { condition: String, status: ConditionStatus },
}

/// One thing a monitor found.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The monitor, e.g. "kernel-monitor".
    pub source: String,
    pub problem: Problem,
    pub reason: String,
    pub message: String,
    pub severity: Severity,
    pub category: Category,
    pub action: RecommendedAction,
    pub attributes: Vec<(String, String)>,
    /// When the problem was observed (for log lines: when they were logged, where known).
    pub time: std::time::SystemTime,
}

impl Finding {
    fn new(source: &str, problem: Problem, reason: &str, message: String, class: Class) -> Finding {
        Finding {
            source: source.into(),
            problem,
            reason: reason.into(),
            message,
            severity: class.severity,
            category: class.category,
            action: class.action,
            attributes: Vec::new(),
            time: std::time::SystemTime::now(),
        }
    }

    pub fn temporary(source: &str, reason: &str, message: String, class: Class) -> Finding {
        Finding::new(source, Problem::Temporary, reason, message, class)
    }

    /// A condition's status; `class` describes the problem when it is present.
    pub fn condition(
        source: &str,
        condition: &str,
        status: ConditionStatus,
        reason: &str,
        message: String,
        class: Class,
    ) -> Finding {
        Finding::new(source, Problem::Permanent { condition: condition.into(), status }, reason, message, class)
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Finding {
        self.attributes.push((key.into(), value.to_string()));
        self
    }
}

/// How bad a problem is, what kind it is, and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub severity: Severity,
    pub category: Category,
    pub action: RecommendedAction,
}

impl Class {
    pub const fn new(severity: Severity, category: Category, action: RecommendedAction) -> Class {
        Class { severity, category, action }
    }
}

/// Severity as written in rule files and configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeverityName {
    Info,
    Warning,
    Error,
    Critical,
}

impl From<SeverityName> for Severity {
    fn from(s: SeverityName) -> Severity {
        match s {
            SeverityName::Info => Severity::Info,
            SeverityName::Warning => Severity::Warning,
            SeverityName::Error => Severity::Error,
            SeverityName::Critical => Severity::Critical,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CategoryName {
    Hardware,
    Kernel,
    Component,
    Resource,
    Custom,
    Network,
}

impl From<CategoryName> for Category {
    fn from(c: CategoryName) -> Category {
        match c {
            CategoryName::Hardware => Category::Hardware,
            CategoryName::Kernel => Category::Kernel,
            CategoryName::Component => Category::Component,
            CategoryName::Resource => Category::Resource,
            CategoryName::Custom => Category::Custom,
            CategoryName::Network => Category::Network,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionName {
    None,
    RestartComponent,
    ReinstallComponent,
    Reboot,
    ReinstallOs,
    HardwareRepair,
    Manual,
}

impl From<ActionName> for RecommendedAction {
    fn from(a: ActionName) -> RecommendedAction {
        match a {
            ActionName::None => RecommendedAction::None,
            ActionName::RestartComponent => RecommendedAction::RestartComponent,
            ActionName::ReinstallComponent => RecommendedAction::ReinstallComponent,
            ActionName::Reboot => RecommendedAction::Reboot,
            ActionName::ReinstallOs => RecommendedAction::ReinstallOs,
            ActionName::HardwareRepair => RecommendedAction::HardwareRepair,
            ActionName::Manual => RecommendedAction::Manual,
        }
    }
}

/// `interval` varied by ±10%, so that a fleet's nodes do not all check in the same second.
pub fn jittered(interval: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.9..1.1);
    interval.mul_f64(f)
}

/// The delay before a periodic check's first run: spread over the first interval, at most 5 s, so
/// that the first results come soon after a start but not at the same instant on every node.
pub fn first_delay(interval: Duration) -> Duration {
    let max = interval.min(Duration::from_secs(5));
    max.mul_f64(rand::rng().random_range(0.0..1.0))
}

/// The running monitors.
pub struct Running {
    logs: Vec<logs::LogMonitorHandle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    cancel: tokio_util::sync::CancellationToken,
}

impl Running {
    /// Stops every monitor: tasks are cancelled, log threads joined.
    pub async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let logs = self.logs;
        let _ = tokio::task::spawn_blocking(move || logs.into_iter().for_each(logs::LogMonitorHandle::stop)).await;
    }
}

/// How often conditions are checked for their time-based clearing.
const CLEARING_INTERVAL: Duration = Duration::from_secs(30);

/// The monitor specs the configuration names: the built-in kernel rules and the rule files.
pub fn specs(config: &crate::config::Config) -> Result<Vec<rules::MonitorSpec>, rules::RuleError> {
    let m = &config.monitors;
    let mut specs = Vec::new();
    if m.kernel_rules {
        specs.push(rules::MonitorSpec::Log(rules::default_kernel_monitor(&config.paths.kmsg)));
    }
    for f in &m.rule_files {
        specs.push(rules::load(f)?);
    }
    Ok(specs)
}

/// Starts every configured monitor, reporting through `reporter`.
pub fn start(
    config: &crate::config::Config,
    reporter: state::Reporter,
    metrics: crate::metrics::Metrics,
    boot_id: &str,
) -> Result<Running, rules::RuleError> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut running = Running { logs: Vec::new(), tasks: Vec::new(), cancel: cancel.clone() };
    let m = &config.monitors;
    if !m.enabled {
        return Ok(running);
    }
    let budget = logs::Budget { lines_per_second: m.lines_per_second, burst: m.burst };
    let global = std::sync::Arc::new(tokio::sync::Semaphore::new(m.plugin_concurrency));
    let mut plugin_specs = Vec::new();
    for spec in specs(config)? {
        match spec {
            rules::MonitorSpec::Log(l) => {
                tracing::info!(monitor = %l.source, file = %l.file.display(), rules = l.rules.len(), "log monitor");
                running.logs.push(logs::spawn(l, reporter.clone(), metrics.clone(), budget, boot_id));
            }
            rules::MonitorSpec::Plugin(p) => {
                for c in &p.conditions {
                    reporter.declare(c);
                }
                plugin_specs.push(p);
            }
        }
    }
    for p in plugin_specs {
        tracing::info!(monitor = %p.source, file = %p.file.display(), rules = p.rules.len(), "custom plugin monitor");
        running.tasks.push(tokio::spawn(plugins::run(p, reporter.clone(), global.clone(), cancel.child_token())));
    }
    let h = &m.hardware;
    if h.enabled {
        let mut checks: Vec<(Box<dyn hardware::Check>, Duration)> = Vec::new();
        let p = &config.paths;
        if h.edac {
            checks.push((Box::new(hardware::Edac::new(&p.sys)), h.interval));
        }
        if h.thermal {
            checks.push((Box::new(hardware::Thermal::new(&p.sys)), h.interval));
        }
        if h.nic {
            checks.push((
                Box::new(hardware::Nics::new(&p.sys, h.interfaces.clone(), h.flap_threshold, h.flap_window)),
                h.interval,
            ));
        }
        if !h.writable_mounts.is_empty() {
            checks.push((Box::new(hardware::Mounts::new(&p.proc, h.writable_mounts.clone())), h.interval));
        }
        if !h.disk_paths.is_empty() {
            checks.push((
                Box::new(hardware::DiskUsage::new(
                    h.disk_paths.clone(),
                    h.disk_threshold_percent,
                    h.inode_threshold_percent,
                )),
                h.interval,
            ));
        }
        if h.psi {
            let t = hardware::PsiThresholds {
                cpu_some: h.psi_cpu_some_percent,
                memory_full: h.psi_memory_full_percent,
                io_full: h.psi_io_full_percent,
            };
            checks.push((Box::new(hardware::Pressure::new(&p.proc, t)), h.interval));
        }
        if h.clock {
            checks.push((Box::new(hardware::Clock::new(h.clock_max_error)), h.interval));
        }
        if !h.smartctl.as_os_str().is_empty() {
            match hardware::Smart::new(&h.smartctl, Duration::from_secs(60)) {
                Some(s) => checks.push((Box::new(s), h.smart_interval)),
                None => tracing::info!(smartctl = %h.smartctl.display(), "smartctl is not installed: no SMART checks"),
            }
        }
        for (check, interval) in checks {
            for c in check.conditions() {
                reporter.declare(&c);
            }
            running.tasks.push(tokio::spawn(run_check(
                check,
                interval,
                reporter.clone(),
                metrics.clone(),
                cancel.child_token(),
            )));
        }
    }
    let c = &m.components;
    if c.enabled && !c.watch.is_empty() {
        for w in &c.watch {
            for d in components::conditions(&w.name) {
                reporter.declare(&d);
            }
        }
        let settings = components::Settings {
            interval: c.interval,
            systemctl: c.systemctl.clone(),
            timeout: c.timeout,
            restart_count: c.restart_count,
            restart_window: c.restart_window,
        };
        running.tasks.push(tokio::spawn(components::run(
            c.watch.clone(),
            settings,
            reporter.clone(),
            cancel.child_token(),
        )));
    }
    running.tasks.push(tokio::spawn(run_clearing(reporter, cancel.child_token())));
    Ok(running)
}

/// Runs a blocking check periodically (on the blocking pool: a hung file system must not stall
/// the agent).
async fn run_check(
    mut check: Box<dyn hardware::Check>,
    interval: Duration,
    reporter: state::Reporter,
    metrics: crate::metrics::Metrics,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut delay = first_delay(interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = jittered(interval);
        let cpu = metrics.check_cpu.clone();
        let (c, findings) = match tokio::task::spawn_blocking(move || {
            let started = crate::metrics::thread_cpu_now();
            let f = check.check();
            let spent = crate::metrics::thread_cpu_now().saturating_sub(started).as_secs_f64();
            *cpu.lock().expect("metrics lock").entry(check.name()).or_default() += spent;
            (check, f)
        })
        .await
        {
            Ok(x) => x,
            Err(err) => {
                tracing::error!(error = %err, "a hardware check failed");
                return;
            }
        };
        check = c;
        if let Err(err) = reporter.report(findings).await {
            tracing::error!(check = check.name(), error = %err, "cannot store findings");
        }
    }
}

/// Clears conditions whose clearing rule is due (a new boot, a time without recurrence): at once
/// on start, then periodically.
async fn run_clearing(reporter: state::Reporter, cancel: tokio_util::sync::CancellationToken) {
    loop {
        let due = reporter.due_clearings(std::time::SystemTime::now());
        if !due.is_empty() {
            for f in &due {
                if let Problem::Permanent { condition, .. } = &f.problem {
                    tracing::info!(condition = %condition, message = %f.message, "condition cleared by its rule");
                }
            }
            if let Err(err) = reporter.report(due).await {
                tracing::error!(error = %err, "cannot store cleared conditions");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CLEARING_INTERVAL) => {}
        }
    }
}
