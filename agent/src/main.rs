//! The nodekeeper-agent binary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodekeeper_agent::config::{Config, DEFAULT_STATUS_PORT};
use nodekeeper_common::config::{EXIT_CONFIG, EXIT_FAILURE};
use nodekeeper_common::logging::{self, LogFormat};
use nodekeeper_common::service;
use nodekeeper_proto::v1::{
    Condition, ConditionStatus, EmitRequest, GetAgentStatusRequest, Observation, Severity,
    local_agent_service_client::LocalAgentServiceClient,
};

/// nodekeeper-agent: keeps this node's observations durable and reports them to the event center.
///
/// Exit codes: 0 stopped cleanly; 1 runtime failure (or, for emit/status, the local agent did
/// not answer); 2 bad flags; 78 bad configuration.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-agent", version)]
struct Args {
    /// TOML configuration file (see packaging/agent.toml).
    #[arg(long, short = 'c', global = true, env = "NODEKEEPER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text, json (one object per line) or journald (native journal fields).
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Hand an observation to the agent running on this node.
    Emit {
        /// Event or condition type, e.g. KernelDeadlock.
        #[arg(long = "type")]
        kind: String,
        #[arg(long, default_value = "")]
        message: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// info, warning, error or critical.
        #[arg(long, default_value = "warning")]
        severity: String,
        /// Make it a condition change: true (open) or false (cleared).
        #[arg(long)]
        condition: Option<bool>,
        /// Recommended action: none, restart-component, reinstall-component, reboot, reinstall-os,
        /// hardware-repair or manual.
        #[arg(long, default_value = "none")]
        action: String,
        /// Port of the local agent's status listener.
        #[arg(long, default_value_t = DEFAULT_STATUS_PORT)]
        port: u16,
    },
    /// Show the local agent's status.
    Status {
        #[arg(long, default_value_t = DEFAULT_STATUS_PORT)]
        port: u16,
    },
    /// Work with monitor rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Manage this node's components without a center.
    Components {
        #[command(subcommand)]
        command: ComponentsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ComponentsCommand {
    /// One reconciliation pass from a local spec file. Finishes or undoes a change an earlier run
    /// left half done first. Each step goes to stderr as it happens; stdout has one line (or JSON
    /// object) per component at the end. Exit 0: every component converged (its line says whether
    /// it changed); 3: a change was rolled back; 4: failed, nothing changed; 78: the spec is
    /// invalid (every defect named with its line), nothing changed.
    Apply {
        /// The spec file (TOML, `[[component]]` tables; see packaging/components.toml).
        #[arg(long)]
        spec: PathBuf,
        /// Install into this root instead of / (rpm and dnf --installroot; config files go there too).
        #[arg(long)]
        installroot: Option<PathBuf>,
        /// Where journals and backups are kept (the agent's state directory); default
        /// /var/lib/nodekeeper, inside the installroot when there is one (state is per root).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Directories config files may be written to (repeat); default /etc.
        #[arg(long = "config-root")]
        config_roots: Vec<PathBuf>,
        /// systemctl to restart units with.
        #[arg(long, default_value = "systemctl")]
        systemctl: PathBuf,
        /// text, or json (one object per component).
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: OutputArg,
        /// Also verify the converged components' files with `rpm -V`, reinstalling what does
        /// not verify (done anyway after an interruption).
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Replay a log offline and print what the agent would report: temporary problems for every
    /// match, conditions when they change. Exit 0 whether or not anything matched; 78 when a rule
    /// file is invalid; 1 when the log cannot be read.
    Test {
        /// Rule file (node-problem-detector JSON or nodekeeper TOML); repeat for several. Default:
        /// the agent's built-in kernel rules.
        #[arg(long = "rules")]
        rules: Vec<PathBuf>,
        /// The log to replay.
        #[arg(long)]
        log: PathBuf,
        /// kmsg (/dev/kmsg records), journal-json (`journalctl -o json`) or plain (one message per
        /// line). Default: guessed from the first line.
        #[arg(long, value_enum)]
        format: Option<LogFormatArg>,
        /// text, or json (one object per finding).
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: OutputArg,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Kmsg,
    JournalJson,
    Plain,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutputArg {
    Text,
    Json,
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    let config = match path {
        Some(p) => nodekeeper_common::config::load::<Config>(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    config.validate().map_err(|e| match path {
        Some(p) => format!("invalid config file {}: {e}", p.display()),
        None => e,
    })?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    // A current-thread runtime: the agent must stay light; blocking work goes to the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    let result = match args.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = match load_config(args.config.as_ref()) {
                Ok(c) => c,
                Err(err) => return service::config_rejected(err),
            };
            runtime
                .block_on(async {
                    let shutdown = nodekeeper_common::shutdown::signal();
                    nodekeeper_agent::run(config, shutdown).await
                })
                .map_err(anyhow::Error::from)
        }
        Command::Emit { kind, message, reason, severity, condition, action, port } => {
            runtime.block_on(emit(port, kind, message, reason, &severity, condition, &action))
        }
        Command::Status { port } => runtime.block_on(status(port)),
        Command::Rules { command: RulesCommand::Test { rules, log, format, output } } => {
            return rules_test(&rules, &log, format, output);
        }
        Command::Components {
            command: ComponentsCommand::Apply { spec, installroot, state_dir, config_roots, systemctl, output, verify },
        } => {
            let args = ApplyArgs { spec, installroot, state_dir, config_roots, systemctl, output, verify };
            return runtime.block_on(components_apply(args));
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "nodekeeper-agent failed");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

async fn client(port: u16) -> anyhow::Result<LocalAgentServiceClient<tonic::transport::Channel>> {
    let url = format!("http://127.0.0.1:{port}");
    LocalAgentServiceClient::connect(url.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the local agent at {url}: {e}"))
}

async fn emit(
    port: u16,
    kind: String,
    message: String,
    reason: String,
    severity: &str,
    condition: Option<bool>,
    action: &str,
) -> anyhow::Result<()> {
    let name = format!("RECOMMENDED_ACTION_{}", action.to_ascii_uppercase().replace('-', "_"));
    let action = nodekeeper_proto::v1::RecommendedAction::from_str_name(&name).ok_or_else(|| {
        anyhow::anyhow!("unknown action {action:?}: expected none, restart-component, reinstall-component, reboot, reinstall-os, hardware-repair or manual")
    })?;
    let severity = match severity {
        "info" => Severity::Info,
        "warning" => Severity::Warning,
        "error" => Severity::Error,
        "critical" => Severity::Critical,
        other => anyhow::bail!("unknown severity {other:?}: expected info, warning, error or critical"),
    };
    let condition = condition.map(|open| Condition {
        r#type: kind.clone(),
        status: if open { ConditionStatus::True } else { ConditionStatus::False } as i32,
        reason: reason.clone(),
        message: message.clone(),
        last_transition_time: Some(nodekeeper_common::time::now_timestamp()),
    });
    let o = Observation {
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: kind,
        reason,
        message,
        severity: severity as i32,
        condition,
        action: action as i32,
        source: "nodekeeper-agent emit".into(),
        ..Default::default()
    };
    let kind = o.r#type.clone();
    let r = client(port)
        .await?
        .emit(EmitRequest { observations: vec![o] })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let sequences: Vec<String> = r.into_inner().sequences.iter().map(u64::to_string).collect();
    use std::io::Write;
    writeln!(
        std::io::stdout().lock(),
        "{kind} stored in the agent's outbox as observation {}; it reaches the event center with the next batch: \
         see it with `nodekeeper events list --type {kind}` and, if it opened a fault, \
         `nodekeeper faults show --type {kind}`",
        sequences.join(",")
    )?;
    Ok(())
}

async fn status(port: u16) -> anyhow::Result<()> {
    let s = client(port)
        .await?
        .get_status(GetAgentStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let s = s.into_inner();
    let json = nodekeeper_proto::json::to_json("nodekeeper.v1.AgentStatus", &s)?;
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

fn rules_test(files: &[PathBuf], log: &PathBuf, format: Option<LogFormatArg>, output: OutputArg) -> ExitCode {
    use nodekeeper_agent::monitor::{Problem, logs, rules};
    let mut specs = Vec::new();
    if files.is_empty() {
        specs.push(rules::default_kernel_monitor(std::path::Path::new("/dev/kmsg")));
    }
    for f in files {
        match rules::load(f) {
            Ok(rules::MonitorSpec::Log(l)) => specs.push(l),
            Ok(rules::MonitorSpec::Plugin(p)) => {
                tracing::error!(file = %f.display(), monitor = %p.source, "a custom plugin monitor has no log to replay");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            Err(err) => {
                tracing::error!(error = %err, "rule file rejected");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    }
    let text = match std::fs::read(log) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(err) => {
            tracing::error!(log = %log.display(), error = %err, "cannot read the log");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    let format = match format {
        Some(LogFormatArg::Kmsg) => logs::Format::Kmsg,
        Some(LogFormatArg::JournalJson) => logs::Format::JournalJson,
        Some(LogFormatArg::Plain) => logs::Format::Plain,
        None => logs::Format::detect(&text),
    };
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in logs::replay(&specs, &text, format) {
        let f = &r.finding;
        let (kind, condition, status) = match &f.problem {
            Problem::Temporary => ("temporary", None, None),
            Problem::Permanent { condition, status } => {
                ("permanent", Some(condition.as_str()), Some(status.as_str_name()))
            }
        };
        let status = status.map(|s| s.trim_start_matches("CONDITION_STATUS_").to_ascii_lowercase());
        let line = match output {
            OutputArg::Json => serde_json::json!({
                "line": r.line,
                "type": kind,
                "source": f.source,
                "reason": f.reason,
                "condition": condition,
                "status": status,
                "message": f.message,
                "severity": f.severity.as_str_name().trim_start_matches("SEVERITY_").to_ascii_lowercase(),
                "category": f.category.as_str_name().trim_start_matches("CATEGORY_").to_ascii_lowercase(),
                "action": f.action.as_str_name().trim_start_matches("RECOMMENDED_ACTION_").to_ascii_lowercase().replace('_', "-"),
            })
            .to_string(),
            OutputArg::Text => match condition {
                Some(c) => format!("line {}: {c} {} ({}): {}", r.line, status.unwrap_or_default(), f.reason, f.message),
                None => format!("line {}: {} (temporary): {}", r.line, f.reason, f.message),
            },
        };
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    let _ = out.flush();
    ExitCode::SUCCESS
}

struct ApplyArgs {
    spec: PathBuf,
    installroot: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    config_roots: Vec<PathBuf>,
    systemctl: PathBuf,
    output: OutputArg,
    verify: bool,
}

async fn components_apply(a: ApplyArgs) -> ExitCode {
    use nodekeeper_agent::components::{Manager, Outcome, Settings, accounts::Accounts, spec as cspec};
    use std::io::Write;
    let config_roots = if a.config_roots.is_empty() { vec!["/etc".into()] } else { a.config_roots };
    let accounts = Accounts::new(a.installroot.as_deref());
    let specs = match cspec::load_for_node(&a.spec, &config_roots, &accounts) {
        Ok(s) => s,
        Err(err) => {
            let _ = writeln!(std::io::stderr().lock(), "{err}\ninvalid spec: nothing changed");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let state_dir = a.state_dir.unwrap_or_else(|| {
        let default = Path::new("/var/lib/nodekeeper");
        match &a.installroot {
            Some(root) => root.join(default.strip_prefix("/").unwrap_or(default)),
            None => default.to_owned(),
        }
    });
    let settings = Settings {
        installroot: a.installroot,
        rpm: "rpm".into(),
        dnf: "dnf".into(),
        systemctl: a.systemctl,
        config_roots,
        state_dir,
        releasever: "1".into(),
        step_timeout: std::time::Duration::from_secs(600),
        // One pass: verified now when asked, else not.
        verify_interval: a.verify.then_some(std::time::Duration::ZERO),
        // Run by an operator in a shell, not in the service's sandbox.
        transaction_runner: Vec::new(),
        // The same lock as the agent's: the packages stay out of the node's other dnf runs.
        version_lock: true,
    };
    let mut manager = Manager::new(settings);
    // Steps as they happen, on stderr; the report, on stdout.
    let mut step = |line: String| {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    };
    let mut outcomes = manager.recover(&specs, &mut step).await;
    outcomes.extend(manager.reconcile(&specs, &mut step).await);
    let statuses = manager.statuses();
    let mut code = 0u8;
    let mut out = std::io::stdout().lock();
    for s in &statuses {
        // The pass's outcomes for it (a recovery, then the reconciliation): the gravest one.
        let mine = || outcomes.iter().filter(|(n, _)| n == &s.name).map(|(_, o)| o);
        let changed = mine().any(|o| *o == Outcome::Converged { changed: true });
        let (word, label, message, exit) = mine()
            .map(|o| match o {
                Outcome::Converged { .. } => ("converged", "converged", "", 0),
                Outcome::RolledBack(m) => ("rolled-back", "ROLLED BACK", m.as_str(), 3),
                Outcome::Failed(m) => ("failed", "FAILED", m.as_str(), 4),
                Outcome::Invalid(m) => ("invalid", "INVALID", m.as_str(), EXIT_CONFIG as u8),
                // Its predecessor's outcome gives the exit code.
                Outcome::Pending(m) => ("pending", "PENDING", m.as_str(), 0),
            })
            .max_by_key(|o| o.3)
            .unwrap_or(("converged", "converged", "", 0));
        code = code.max(exit);
        let installed = if s.installed_version.is_empty() { "none" } else { &s.installed_version };
        let line = match a.output {
            OutputArg::Json => serde_json::json!({
                "component": s.name,
                "outcome": word,
                "changed": changed,
                "installed": s.installed_version,
                "desired": s.desired_version,
                "message": message,
            })
            .to_string(),
            OutputArg::Text => {
                let changed = if changed { "changed" } else { "unchanged" };
                let message = if message.is_empty() { String::new() } else { format!(": {message}") };
                format!(
                    "{}: {label} ({changed}), installed {installed}, desired {}{message}",
                    s.name, s.desired_version
                )
            }
        };
        let _ = writeln!(out, "{line}");
    }
    ExitCode::from(code)
}
