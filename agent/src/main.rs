//! The nodekeeper-agent binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodekeeper_agent::config::{Config, DEFAULT_STATUS_PORT};
use nodekeeper_common::config::{EXIT_CONFIG, EXIT_FAILURE};
use nodekeeper_common::logging::{self, LogFormat};
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
    /// Log format: text or json.
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
        /// Port of the local agent's status listener.
        #[arg(long, default_value_t = DEFAULT_STATUS_PORT)]
        port: u16,
    },
    /// Show the local agent's status.
    Status {
        #[arg(long, default_value_t = DEFAULT_STATUS_PORT)]
        port: u16,
    },
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
                Err(err) => {
                    tracing::error!(error = %err, "configuration rejected");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            };
            runtime
                .block_on(async {
                    let shutdown = nodekeeper_common::shutdown::signal();
                    nodekeeper_agent::run(config, shutdown).await
                })
                .map_err(anyhow::Error::from)
        }
        Command::Emit { kind, message, reason, severity, condition, port } => {
            runtime.block_on(emit(port, kind, message, reason, &severity, condition))
        }
        Command::Status { port } => runtime.block_on(status(port)),
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
) -> anyhow::Result<()> {
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
        source: "nodekeeper-agent emit".into(),
        ..Default::default()
    };
    let r = client(port)
        .await?
        .emit(EmitRequest { observations: vec![o] })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    tracing::info!(sequences = ?r.into_inner().sequences, "stored in the outbox");
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
