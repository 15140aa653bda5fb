//! The nodekeeper-detector binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekeeper_common::logging::{self, LogFormat};
use nodekeeper_common::service;
use nodekeeper_detector::config::Config;

/// nodekeeper-detector: probes nodes from outside and reports AgentDown, KubeletDown and
/// NodeUnreachable to the event center.
///
/// Exit codes: 0 stopped cleanly; 1 runtime failure; 2 bad flags; 78 bad configuration.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-detector", version)]
struct Args {
    /// TOML configuration file (see packaging/detector.toml).
    #[arg(long, short = 'c', env = "NODEKEEPER_DETECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text, json (one object per line) or journald (native journal fields).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let config = match &args.config {
        Some(p) => nodekeeper_common::config::load::<Config>(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
    .and_then(|c| {
        c.validate().map_err(|e| match &args.config {
            Some(p) => format!("invalid config file {}: {e}", p.display()),
            None => e,
        })?;
        Ok(c)
    });
    let config = match config {
        Ok(c) => c,
        Err(err) => return service::config_rejected(err),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(2);
    service::run(runtime, "nodekeeper-detector", async move {
        let shutdown = nodekeeper_common::shutdown::signal();
        // Connects lazily: a detector that starts before the center waits for it.
        let channel = nodekeeper_common::tls::center_channel(&config.center, config.tls.as_ref(), |e| {
            e.connect_timeout(std::time::Duration::from_secs(5)).timeout(std::time::Duration::from_secs(10))
        })?;
        if config.insecure {
            tracing::warn!("talking to the center WITHOUT TLS (insecure): development and tests only");
        }
        tracing::info!(name = %config.name, center = %config.center, replica = config.replica, replicas = config.replicas, "detector starting");
        let metrics_listen = config.metrics_listen;
        let detector = nodekeeper_detector::Detector::new(config, channel);
        if let Some(addr) = metrics_listen {
            let metrics = detector.metrics.clone();
            let render = move || std::future::ready(metrics.render());
            nodekeeper_common::metrics::spawn(addr, render, tokio_util::sync::CancellationToken::new()).await?;
        }
        let watchdog = nodekeeper_common::systemd::spawn_watchdog(tokio_util::sync::CancellationToken::new());
        nodekeeper_common::systemd::ready();
        detector.run(shutdown).await;
        if let Some(w) = watchdog {
            w.abort();
        }
        nodekeeper_common::systemd::stopping();
        anyhow::Ok(())
    })
}
