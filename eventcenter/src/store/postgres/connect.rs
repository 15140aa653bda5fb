//! How a replica reaches the database: the libpq-style URL, TLS, and the session settings every
//! connection gets (the writer's, the listener's, the pool's, `migrate`'s).

use std::path::PathBuf;

use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::pg;
use crate::store::{Result, StoreError};

/// TLS to PostgreSQL (`[store] postgres_ca`, `postgres_cert`, `postgres_key`). The URL's
/// `sslmode` says whether it is used: `require` refuses a server without TLS, `prefer` (libpq's
/// default) uses it when the server offers it, `disable` never. Whenever it is used the server's
/// certificate and host name are verified, against `ca` or else the system's trust store.
#[derive(Debug, Clone, Default)]
pub struct PgTls {
    /// CA certificates (PEM) the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that authenticate by certificate.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The database as every connection of a replica reaches it.
#[derive(Clone)]
pub(crate) struct Database {
    pub(crate) config: Config,
    pub(crate) tls: MakeRustlsConnect,
}

impl Database {
    pub(crate) fn new(url: &str, tls: &PgTls) -> Result<Database> {
        let mut config: Config =
            url.parse().map_err(|e| StoreError::Postgres { message: format!("connection URL: {e}") })?;
        // Prepared statements planned at each run: a plan cached while the log was small (a new
        // deployment) would scan the whole table for the identities' lookup once it is large
        // (measured: the database's CPU doubled at 20,000 events/s).
        let session = format!("{} -c plan_cache_mode=force_custom_plan", config.get_options().unwrap_or_default());
        config.options(session.trim_start());
        let client = tls.client.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
        let rustls = nodekeeper_common::tls::external_client_config(tls.ca.as_deref(), client, &[])
            .map_err(|e| StoreError::Postgres { message: format!("TLS to PostgreSQL: {e}") })?;
        Ok(Database { config, tls: MakeRustlsConnect::new(std::sync::Arc::unwrap_or_clone(rustls)) })
    }

    /// A connection whose driver runs on its own task.
    pub(crate) async fn connect(&self) -> Result<Client> {
        let (client, conn) = self.config.connect(self.tls.clone()).await.map_err(pg)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %pg(e), "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// A pool of `size` connections, each made when first needed and replaced when broken.
    pub(crate) fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool> {
        let manager = deadpool_postgres::Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .build()
            .map_err(|e| StoreError::Postgres { message: format!("connection pool: {e}") })
    }
}
