//! nodekeeper-eventcenter: the durable record of every fault.
//!
//! `run` takes an already bound listener (tests bind port 0) and a shutdown future; the binary in
//! `main.rs` only parses flags, loads the config and maps the result to an exit code.

pub mod alertmanager;
pub mod alerts;
pub mod api;
pub mod config;
pub mod cursor;
pub mod gate;
pub mod limits;
pub mod liveness;
pub mod metrics;
pub mod permits;
pub mod quorum;
pub mod readiness;
pub mod rollout;
pub mod selector;
pub mod store;
pub mod subscribe;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::v1::{
    agent_service_server::AgentServiceServer, event_service_server::EventServiceServer,
    fleet_service_server::FleetServiceServer, permit_service_server::PermitServiceServer,
    report_service_server::ReportServiceServer, rollout_service_server::RolloutServiceServer,
};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use crate::api::Ctx;
use crate::config::Config;
use crate::store::{Store, StoreError, StoreOptions};
use nodekeeper_common::tls::ServerTls;

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] nodekeeper_common::tls::TlsError),
    #[error("{0}")]
    Alertmanager(String),
    #[error("{0}")]
    Metrics(std::io::Error),
    #[error("no [tls] configured: mutual TLS is the default; set tls.ca, tls.cert and tls.key, or run with --insecure")]
    NoTls,
}

/// How this center reaches PostgreSQL, from its `[store]` settings.
pub fn postgres_options(store: &config::StoreConfig) -> store::postgres::PgOptions {
    store::postgres::PgOptions {
        commit_max_rows: store.commit_max_rows,
        tls: store::postgres::PgTls {
            ca: store.postgres_ca.clone(),
            client: store.postgres_cert.clone().zip(store.postgres_key.clone()),
        },
    }
}

/// Serves until `shutdown` resolves, then stops accepting, ends open streams with UNAVAILABLE
/// (clients resume from their cursor or resend), waits up to `drain_timeout`, and closes the store
/// after its last commit.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let tls = match (&config.tls, config.insecure) {
        (Some(files), _) => Some(ServerTls::new(files.clone())?),
        (None, true) => {
            tracing::warn!("serving WITHOUT TLS (insecure): any client can act as any node; for development only");
            None
        }
        (None, false) => return Err(RunError::NoTls),
    };
    let store = match &config.store.postgres_url {
        Some(url) => {
            let options = postgres_options(&config.store);
            Store::Postgres(Arc::new(store::postgres::PgStore::open(url, options).await?))
        }
        None => Store::Sqlite(store::Sqlite::open(
            &config.data_dir,
            StoreOptions {
                commit_max_rows: config.store.commit_max_rows,
                commit_delay: config.store.commit_delay,
                max_pending_rows: config.store.max_pending_rows,
                min_free_bytes: config.store.min_free_bytes,
            },
        )?),
    };
    let cancel = CancellationToken::new();
    let (liveness, mut tasks) = liveness::Liveness::start(store.clone(), config.nodes.clone(), cancel.clone()).await?;
    let leading = store.leading();
    let (retention, every) = (config.store.retention, config.store.retention_interval);
    let retained = store.clone();
    tasks.push(while_leading(leading.clone(), "retention", cancel.clone(), move |stop| {
        tokio::spawn(retention_loop(retained.clone(), retention, every, stop))
    }));
    let config = Arc::new(config);
    // The detector verdicts the store holds as open conditions.
    let open_verdicts = quorum::open_verdicts(&store).await?;
    let alertmanager =
        alertmanager::Alertmanager::new(&config.alertmanager).map_err(RunError::Alertmanager)?.map(Arc::new);
    let gates = gate::Gates::new(config.permits.gate.clone(), alertmanager.clone(), config.alertmanager.query_interval);
    let permits = Arc::new(permits::RateLimiter::load(config.permits.clone(), gates, &store).await?);
    let webhooks = alertmanager::Webhooks::new(
        &config.alerts.webhooks,
        config.alerts.webhook_repeat_interval,
        config.alertmanager.timeout,
    )
    .map_err(RunError::Alertmanager)?;
    if alertmanager.is_some() || webhooks.is_some() {
        let sources = alerts::Sources {
            permits: permits.clone(),
            store: store.clone(),
            liveness: liveness.clone(),
            config: config.alerts.clone(),
        };
        let resend = config.alertmanager.resend_interval;
        tasks.push(while_leading(leading.clone(), "ops alerts", cancel.clone(), move |stop| {
            tokio::spawn(alerts::run(alertmanager.clone(), webhooks.clone(), sources.clone(), resend, stop))
        }));
    }
    if let Some(addr) = config.metrics_listen {
        let m = Arc::new(metrics::Metrics::new(store.clone(), liveness.clone(), permits.decisions.clone()));
        let render = move || {
            let m = m.clone();
            async move { m.render().await }
        };
        tasks.push(nodekeeper_common::metrics::spawn(addr, render, cancel.clone()).await.map_err(RunError::Metrics)?);
    }
    let ctx = Ctx {
        store: store.clone(),
        liveness,
        config: config.clone(),
        cancel: cancel.clone(),
        authenticated: tls.is_some(),
        limits: Arc::new(limits::Limits::new(&config.limits)),
        sessions: Arc::default(),
        quorum: Arc::new(quorum::Quorum::new(open_verdicts)),
        permits,
        rollouts: Arc::default(),
    };

    if store.shared() {
        let (folding, quorum) = (store.clone(), config.detectors.quorum);
        tasks.push(while_leading(leading.clone(), "detector quorum", cancel.clone(), move |stop| {
            tokio::spawn(quorum::follow(folding.clone(), quorum, stop))
        }));
    }
    let controlled = ctx.clone();
    tasks.push(while_leading(leading, "rollout controller", cancel.clone(), move |stop| {
        tokio::spawn(rollout::controller::run(Ctx { cancel: stop, ..controlled.clone() }))
    }));

    tasks.push(tokio::spawn(send_agents_away_when_cut_off(store.alive(), ctx.sessions.clone(), cancel.clone())));

    let max = config.limits.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventServiceServer<api::events::EventApi>>().await;
    let mut disk = store.watch_disk();
    let low = disk.borrow_and_update().low;
    writers_health(&health, low).await;
    let stop = cancel.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = disk.changed() => if changed.is_err() { return },
            }
            let low = disk.borrow_and_update().low;
            writers_health(&health, low).await;
        }
    }));
    // Reflection lists what this server serves, not every service in the descriptor sets (the
    // agent's LocalAgentService shares the files).
    let reflection = || {
        use tonic::server::NamedService;
        let served = [
            tonic_health::pb::health_server::HealthServer::<tonic_health::server::HealthService>::NAME,
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            AgentServiceServer::<api::agent::AgentApi>::NAME,
            EventServiceServer::<api::events::EventApi>::NAME,
            FleetServiceServer::<api::fleet::FleetApi>::NAME,
            ReportServiceServer::<api::report::ReportApi>::NAME,
            PermitServiceServer::<api::permits::PermitApi>::NAME,
            RolloutServiceServer::<api::rollouts::RolloutApi>::NAME,
        ];
        served.into_iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(nodekeeper_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name),
        )
    };

    let local = listener.local_addr().ok();
    let server = tonic::transport::Server::builder()
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(2 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(AgentServiceServer::new(api::agent::AgentApi(ctx.clone())).max_decoding_message_size(max))
        .add_service(EventServiceServer::new(api::events::EventApi(ctx.clone())).max_decoding_message_size(max))
        .add_service(FleetServiceServer::new(api::fleet::FleetApi(ctx.clone())).max_decoding_message_size(max))
        .add_service(ReportServiceServer::new(api::report::ReportApi(ctx.clone())).max_decoding_message_size(max))
        .add_service(PermitServiceServer::new(api::permits::PermitApi(ctx.clone())).max_decoding_message_size(max))
        .add_service(RolloutServiceServer::new(api::rollouts::RolloutApi(ctx.clone())).max_decoding_message_size(max));
    let stop = cancel.clone().cancelled_owned();
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match &tls {
        Some(tls) => {
            tasks.push(tokio::spawn(reload_on_sighup(tls.clone(), cancel.clone())));
            Box::pin(server.serve_with_incoming_shutdown(tls.clone().incoming(listener), stop))
        }
        None => Box::pin(server.serve_with_incoming_shutdown(incoming(listener), stop)),
    };
    drop(ctx);
    tracing::info!(listen = ?local, data_dir = %config.data_dir.display(), "event center serving");
    let watchdog = nodekeeper_common::systemd::spawn_watchdog(cancel.child_token());
    nodekeeper_common::systemd::ready();
    nodekeeper_common::systemd::status(&format!("serving on {local:?}, head cursor {}", store.head()));

    let mut server = server;
    let served = tokio::select! {
        r = &mut server => r,
        _ = shutdown => {
            nodekeeper_common::systemd::stopping();
            cancel.cancel();
            match tokio::time::timeout(config.drain_timeout, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(timeout = ?config.drain_timeout, "connections did not drain in time; closing them");
                    Ok(())
                }
            }
        }
    };
    cancel.cancel();
    // The server's handlers hold the liveness tracker, whose persister ends when the last of them
    // is gone: drop it even when draining timed out, and bound the wait anyway.
    drop(server);
    for t in tasks {
        match tokio::time::timeout(config.drain_timeout, t).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "background task failed"),
            Err(_) => tracing::warn!("a background task did not stop in time"),
        }
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    store.close().await;
    tracing::info!("event center stopped");
    served.map_err(RunError::from)
}

/// A replica whose lease on the database ran out (cut off from it) has had its nodes taken over
/// by the others, which hear none of their heartbeats: it ends its agents' streams so that they
/// reconnect to a replica that can record them, and are not declared lost meanwhile.
async fn send_agents_away_when_cut_off(
    mut alive: tokio::sync::watch::Receiver<Option<u64>>,
    sessions: Arc<api::agent::Sessions>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = alive.changed() => if changed.is_err() { return },
        }
        if alive.borrow_and_update().is_none() {
            // It stops counting itself alive at its renew deadline; the others take its nodes
            // over only once the lease has run out. A database failover shorter than that (the
            // replica's commits wait and go on) keeps the streams.
            let expiry = {
                let lease = store::postgres::lease::LeaseConfig::default();
                lease.lease_duration.saturating_sub(lease.renew_deadline)
            };
            let back = tokio::select! {
                _ = cancel.cancelled() => return,
                back = tokio::time::timeout(expiry, alive.wait_for(Option::is_some)) => back,
            };
            if matches!(back, Ok(Ok(_))) {
                continue;
            }
            let status =
                tonic::Status::unavailable("this replica lost its lease on the database: reconnect to another");
            let ended = sessions.close_all(&status);
            tracing::error!(streams = ended, "lost this replica's lease on the database; ended its agents' streams");
        }
    }
}

/// Runs work that must run once among the replicas while this replica leads (always, on
/// SQLite): started when it starts leading, cancelled when it stops.
fn while_leading<F>(
    mut leading: tokio::sync::watch::Receiver<Option<u64>>,
    name: &'static str,
    cancel: CancellationToken,
    start: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(CancellationToken) -> tokio::task::JoinHandle<()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut running: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
        loop {
            let lead = *leading.borrow_and_update();
            match (lead, running.take()) {
                (Some(epoch), None) => {
                    tracing::info!(work = name, epoch, "leading: starting");
                    let stop = cancel.child_token();
                    running = Some((stop.clone(), start(stop)));
                }
                (None, Some((stop, task))) => {
                    tracing::warn!(work = name, "no longer leading: stopping");
                    stop.cancel();
                    let _ = task.await;
                }
                (_, r) => running = r,
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                // A sender gone (SQLite's constant lead) changes nothing any more.
                changed = leading.changed() => if changed.is_err() { cancel.cancelled().await; break },
            }
        }
        if let Some((stop, task)) = running {
            stop.cancel();
            let _ = task.await;
        }
    })
}

/// The services that write say NOT_SERVING while the store's disk is within its reserve; reads
/// and subscriptions go on (the overall health stays SERVING).
async fn writers_health(health: &tonic_health::server::HealthReporter, disk_low: bool) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let status = if disk_low { NotServing } else { Serving };
    health.set_service_status(<AgentServiceServer<api::agent::AgentApi> as NamedService>::NAME, status).await;
    health.set_service_status(<FleetServiceServer<api::fleet::FleetApi> as NamedService>::NAME, status).await;
    health.set_service_status(<ReportServiceServer<api::report::ReportApi> as NamedService>::NAME, status).await;
    health.set_service_status(<PermitServiceServer<api::permits::PermitApi> as NamedService>::NAME, status).await;
    health.set_service_status(<RolloutServiceServer<api::rollouts::RolloutApi> as NamedService>::NAME, status).await;
}

/// SIGHUP re-reads the TLS certificate, key and CA (they are also re-read when they change).
async fn reload_on_sighup(tls: std::sync::Arc<ServerTls>, cancel: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; TLS files are still re-read when they change");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading TLS files");
                tls.reload();
            }
        }
    }
}

/// Accepted connections with TCP_NODELAY: tonic's own `tcp_nodelay` applies only to listeners it
/// binds itself, and without it Nagle's algorithm meets delayed ACKs and holds small frames (acks,
/// subscription events) for 40 ms.
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(err) = conn.set_nodelay(true) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY on a connection");
        }
        Ok(conn)
    })
}

/// How long the lease of a replica that died is kept (for whoever looks into the database).
const DEAD_REPLICA_KEPT: Duration = Duration::from_secs(3600);

/// Deletes events older than the retention, a chunk at a time so that ingest is not held up; and
/// the leases of replicas stopped or dead for an hour.
async fn retention_loop(store: Store, retention: Duration, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let cutoff_ms = nodekeeper_common::time::to_unix_ms(cutoff);
        loop {
            match store.retain(cutoff_ms, 10_000).await {
                Ok(0) => break,
                Ok(n) => tracing::info!(deleted = n, floor = store.floor(), "retention removed old events"),
                Err(err) => {
                    tracing::error!(error = %err, "retention failed");
                    break;
                }
            }
            if cancel.is_cancelled() {
                return;
            }
        }
        match store.forget_dead_replicas(DEAD_REPLICA_KEPT).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(replicas = n, "removed the leases of replicas stopped or dead for an hour"),
            Err(err) => tracing::warn!(error = %err, "cannot remove the leases of replicas that are gone"),
        }
    }
}
