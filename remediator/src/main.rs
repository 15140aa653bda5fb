//! The nodekeeper-remediator binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekeeper_common::logging::{self, LogFormat};
use nodekeeper_common::service;
use nodekeeper_remediator::config::Config;

/// nodekeeper-remediator: follows one cluster's faults, isolates faulty nodes, labels their pods
/// to be migrated, recovers them, releases them when their readiness gates hold, and escalates
/// what it cannot heal.
///
/// Exit codes: 0 stopped cleanly; 1 runtime failure; 2 bad flags; 78 bad configuration.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-remediator", version)]
struct Args {
    /// TOML configuration file (see packaging/remediator.toml).
    #[arg(long, short = 'c', env = "NODEKEEPER_REMEDIATOR_CONFIG")]
    config: PathBuf,
    /// Plan only: record and print the steps, do nothing (overrides the config).
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(2);
    service::run(runtime, "remediator", async move {
        let shutdown = nodekeeper_common::shutdown::signal();
        if config.tls.is_none() {
            tracing::warn!("talking to the center WITHOUT TLS (insecure): development and tests only");
        }
        let channel = nodekeeper_common::tls::center_channel(&config.center, config.tls.as_ref(), |e| {
            e.connect_timeout(std::time::Duration::from_secs(5)).timeout(std::time::Duration::from_secs(30))
        })?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let metrics_listen = config.metrics_listen;
        let remediator = nodekeeper_remediator::Remediator::new(config, channel, cancel.clone()).await?;
        if let Some(addr) = metrics_listen {
            let r = remediator.clone();
            nodekeeper_common::metrics::spawn(addr, move || std::future::ready(r.render_metrics()), cancel.clone())
                .await?;
        }
        let _watchdog = nodekeeper_common::systemd::spawn_watchdog(cancel.child_token());
        // With leader election, a replica acts only while it leads; without, at once.
        let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
        let campaign = tokio_util::sync::CancellationToken::new();
        let election = match remediator.elector()? {
            Some(elector) => Some(tokio::spawn(elector.run(leading_tx, campaign.clone()))),
            None => {
                leading_tx.send_replace(true);
                None
            }
        };
        nodekeeper_common::systemd::ready();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut lost = false;
        let leads = tokio::select! {
            _ = &mut shutdown => false,
            l = leading.wait_for(|l| *l) => l.is_ok(),
        };
        if leads {
            remediator.set_leading(true);
            let exporter = remediator.conditions_exporter().map(|e| tokio::spawn(e.run()));
            let node_sync = remediator.node_sync().map(|s| tokio::spawn(s.run()));
            let rollout_work = remediator.rollout_worker().map(|w| tokio::spawn(w.run()));
            let running = tokio::spawn(remediator.clone().run());
            tokio::select! {
                _ = &mut shutdown => {}
                _ = leading.wait_for(|l| !*l) => lost = true,
            }
            nodekeeper_common::systemd::stopping();
            cancel.cancel();
            for task in [Some(running), exporter, node_sync, rollout_work].into_iter().flatten() {
                let _ = task.await;
            }
            remediator.set_leading(false);
        }
        cancel.cancel();
        // The lease is given up only once nothing of this replica acts any more.
        campaign.cancel();
        if let Some(e) = election {
            let _ = e.await;
        }
        if lost {
            anyhow::bail!("lost the leader election lease: stopped acting; the supervisor starts this replica again");
        }
        tracing::info!("remediator stopped");
        anyhow::Ok(())
    })
}
