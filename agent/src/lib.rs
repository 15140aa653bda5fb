//! nodekeeper-agent: runs on every node, records observations durably and reports them to the
//! event center over one long-lived stream.
//!
//! `run` wires the parts: identity and inventory (`identity`), the durable outbox (`outbox`), the
//! stream to the center (`connection`), the local status listener (`status`), metrics and systemd
//! notifications, and the health monitors (`monitor`). The component manager comes with its own
//! issue.

pub mod components;
pub mod config;
pub mod connection;
pub mod identity;
pub mod metrics;
pub mod monitor;
pub mod outbox;
pub mod status;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_proto::v1::Hello;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use nodekeeper_common::systemd;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error(transparent)]
    Rules(#[from] monitor::rules::RuleError),
}

/// Runs the agent until `shutdown` resolves, then flushes what is in flight and stops.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let node = identity::node_name(config.node_name.as_deref(), &config.paths)?;
    let boot_id = identity::boot_id(&config.paths)?;
    let outbox = outbox::Outbox::open(&config.state_dir, config.outbox.max_bytes)?;
    let stats = outbox.stats();
    tracing::info!(node = %node, cluster = %config.cluster, boot_id = %boot_id, outbox_depth = stats.depth,
        last_sequence = stats.last_sequence, state_dir = %config.state_dir.display(), "agent starting");
    let addrs = if config.status.listen.is_empty() {
        default_status_addrs(&config.center).await
    } else {
        config.status.listen.clone()
    };
    let listeners = status::bind(&addrs, config.status.port).await.map_err(AgentError::Listen)?;
    let status_port = listeners.first().and_then(|l| l.local_addr().ok()).map_or(config.status.port, |a| a.port());

    let hello = Hello {
        node: node.clone(),
        cluster: config.cluster.clone(),
        boot_id: boot_id.clone(),
        agent_version: nodekeeper_common::VERSION.to_owned(),
        inventory: Some(identity::inventory(&config.paths)),
        last_acked_sequence: stats.acked_upto,
        heartbeat_interval: Some(nodekeeper_common::time::to_duration(config.heartbeat_interval)),
        labels: config.labels.clone(),
        status_port: u32::from(status_port),
    };
    let config = Arc::new(config);
    let metrics = metrics::Metrics::default();
    let state = Arc::new(Mutex::new(connection::ConnState::default()));
    let cancel = CancellationToken::new();
    let reporter = monitor::state::Reporter::open(outbox.clone(), &boot_id)?;
    let monitors = monitor::start(&config, reporter.clone(), metrics.clone(), &boot_id)?;
    let cm = &config.component_manager;
    let (components, components_task) = if cm.enabled {
        let settings = components::Settings {
            installroot: cm.installroot.clone(),
            rpm: cm.rpm.clone(),
            dnf: cm.dnf.clone(),
            systemctl: cm.systemctl.clone(),
            config_roots: cm.config_roots.clone(),
            state_dir: config.state_dir.clone(),
            releasever: cm.releasever.clone(),
            step_timeout: cm.step_timeout,
            verify_interval: (!cm.verify_interval.is_zero()).then_some(cm.verify_interval),
            transaction_runner: cm.transaction_runner.clone(),
            version_lock: cm.version_lock,
        };
        let driver = components::driver::Driver {
            manager: components::Manager::new(settings),
            reporter,
            interval: cm.reconcile_interval,
            spec_file: cm.spec_file.clone(),
            state_dir: config.state_dir.clone(),
        };
        let (link, task) = driver.spawn(cancel.child_token());
        (Some(link), Some(task))
    } else {
        (None, None)
    };

    let local = status::Local {
        node,
        cluster: config.cluster.clone(),
        boot_id,
        center: config.center.clone(),
        outbox: outbox.clone(),
        metrics: metrics.clone(),
        state: state.clone(),
    };
    tracing::info!(addresses = ?addrs, port = status_port, "status listener (gRPC health, /metrics, local API)");
    let status_task = tokio::spawn(status::serve(listeners, local, cancel.child_token()));
    let watchdog = systemd::spawn_watchdog(cancel.child_token());
    systemd::ready();
    systemd::status(&format!("outbox open ({} waiting); connecting to {}", stats.depth, config.center));

    let conn_cancel = CancellationToken::new();
    let connection = connection::Connection {
        config: config.clone(),
        hello,
        outbox,
        metrics,
        state,
        inventory_paths: config.paths.clone(),
        components,
        healthy_after: None,
        address: rand::random::<u32>() as usize,
    };
    let mut conn_task = tokio::spawn(connection.run(conn_cancel.clone()));

    tokio::select! {
        _ = shutdown => {}
        r = &mut conn_task => {
            tracing::error!(result = ?r, "connection task ended unexpectedly");
        }
    }
    systemd::stopping();
    monitors.stop().await;
    conn_cancel.cancel();
    let flush = config.flush_timeout + Duration::from_secs(1);
    if tokio::time::timeout(flush, &mut conn_task).await.is_err() {
        tracing::warn!("connection did not stop in time");
        conn_task.abort();
    }
    cancel.cancel();
    if let Some(t) = components_task {
        let _ = t.await;
    }
    match status_task.await {
        Ok(Err(err)) => tracing::error!(error = %err, "status listener failed"),
        Err(err) => tracing::error!(error = %err, "status listener task failed"),
        Ok(Ok(())) => {}
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// 127.0.0.1, plus the address this node uses toward the center (what the detector will probe).
async fn default_status_addrs(center: &str) -> Vec<IpAddr> {
    let mut addrs = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    for address in nodekeeper_common::tls::center_addresses(center) {
        if let Some(ip) = local_ip_toward(address).await
            && !ip.is_loopback()
            && !ip.is_unspecified()
            && !addrs.contains(&ip)
        {
            addrs.push(ip);
        }
    }
    addrs
}

async fn local_ip_toward(center: &str) -> Option<IpAddr> {
    let uri: tonic::codegen::http::Uri = center.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let target = tokio::net::lookup_host((host.as_str(), port)).await.ok()?.next()?;
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    // Connecting a UDP socket sends nothing; it only asks the kernel for the route's source.
    let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
    socket.connect(target).await.ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}
