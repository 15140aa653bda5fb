//! The nodekeeper-storage binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekeeper_common::logging::{self, LogFormat};
use nodekeeper_common::service;
use nodekeeper_storage::config::Config;

/// nodekeeper-storage: keeps storage access lists (iSCSI initiator names on tgt, NFS client
/// addresses, any list a command can change) equal to one cluster's nodes: a node that registers
/// or changes its address or initiator name is added, one decommissioned or replaced is removed
/// after a grace, edits on the target are repaired, and a pass that would remove too much waits
/// for a person.
///
/// Exit codes: 0 stopped cleanly; 1 runtime failure; 2 bad flags; 78 bad configuration.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-storage", version)]
struct Args {
    /// TOML configuration file (see packaging/storage.toml).
    #[arg(long, short = 'c', env = "NODEKEEPER_STORAGE_CONFIG")]
    config: PathBuf,
    /// Plan only: record and log the changes, make none (overrides the config).
    #[arg(long)]
    dry_run: bool,
    /// Log format: text, json (one object per line) or journald (native journal fields).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let config =
        nodekeeper_common::config::load::<Config>(&args.config).map_err(|e| e.to_string()).and_then(|mut c| {
            c.dry_run |= args.dry_run;
            c.validate().map_err(|e| format!("invalid config file {}: {e}", args.config.display()))?;
            Ok(c)
        });
    let config = match config {
        Ok(c) => c,
        Err(err) => return service::config_rejected(err),
    };
    service::run(tokio::runtime::Builder::new_current_thread(), "storage syncer", async move {
        let shutdown = nodekeeper_common::shutdown::signal();
        if config.tls.is_none() {
            tracing::warn!("talking to the center WITHOUT TLS (insecure): development and tests only");
        }
        let channel = nodekeeper_common::tls::center_channel(&config.center, config.tls.as_ref(), |e| {
            e.connect_timeout(std::time::Duration::from_secs(5)).timeout(std::time::Duration::from_secs(60))
        })?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let metrics_listen = config.metrics_listen;
        let syncer = nodekeeper_storage::Syncer::new(config, channel, cancel.clone())?;
        if let Some(addr) = metrics_listen {
            let s = syncer.clone();
            nodekeeper_common::metrics::spawn(addr, move || std::future::ready(s.metrics.render()), cancel.clone())
                .await?;
        }
        let _watchdog = nodekeeper_common::systemd::spawn_watchdog(cancel.child_token());
        nodekeeper_common::systemd::ready();
        let running = tokio::spawn(syncer.run());
        shutdown.await;
        nodekeeper_common::systemd::stopping();
        cancel.cancel();
        let _ = running.await;
        tracing::info!("storage syncer stopped");
        anyhow::Ok(())
    })
}
