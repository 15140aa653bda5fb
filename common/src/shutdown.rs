//! The shutdown signal every service waits on: SIGTERM (systemd) or SIGINT (Ctrl-C).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal as unix_signal};

/// Installs the SIGTERM and SIGINT handlers now (call it early: a signal that arrives before its
/// handler is installed kills the process) and returns a future that resolves on the first of
/// them. Must be called inside a tokio runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let term = unix_signal(SignalKind::terminate());
    let int = unix_signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
                }
            }
            (term, int) => {
                let err = term.err().or(int.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::error!(error = %err, "cannot install signal handlers; the process cannot stop gracefully");
                std::future::pending::<()>().await;
            }
        }
    }
}
