//! Serving Prometheus metrics. Every service keeps its metrics in a `prometheus_client` registry,
//! which encodes OpenMetrics; a scraper that asks for OpenMetrics (Prometheus does) gets that, any
//! other (curl, `promtool check metrics`, older scrapers) gets the Prometheus text format 0.0.4,
//! whose counter families carry their `_total` suffix and which has no `# UNIT` or `# EOF` lines.

use std::future::Future;
use std::net::SocketAddr;

use prometheus_client::registry::Registry;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `registry` as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %err, "cannot encode metrics");
    }
    out
}

/// The content type and body for a scraper that sent `accept`, from an OpenMetrics exposition.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (TEXT, text_format(&openmetrics))
    }
}

/// OpenMetrics → Prometheus text format 0.0.4, for what prometheus_client emits: counter
/// families are renamed to their samples' `_total` name, `_created` samples and `# UNIT` /
/// `# EOF` lines are dropped. Histograms and gauges read the same in both.
pub fn text_format(openmetrics: &str) -> String {
    let mut counters = Vec::new();
    for line in openmetrics.lines() {
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")) {
            counters.push(name);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                if name.strip_suffix("_created").is_some_and(|base| counters.contains(&base)) {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` on `listener` until `cancel`; `render` gives the OpenMetrics text at
/// each scrape (a service updates its scrape-time gauges there).
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    render: F,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
            let (content_type, body) = negotiate(accept, render().await);
            ([(axum::http::header::CONTENT_TYPE, content_type)], body)
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await
}

/// Binds `addr` and serves metrics in a task; the error names the address.
pub async fn spawn<F, Fut>(
    addr: SocketAddr,
    render: F,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for metrics on {addr}: {e}")))?;
    tracing::info!(listen = %addr, "serving /metrics");
    Ok(tokio::spawn(async move {
        if let Err(err) = serve(listener, render, cancel).await {
            tracing::error!(error = %err, "metrics listener failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn text_format_names_counters_with_total_and_drops_openmetrics_lines() {
        let mut r = Registry::with_prefix("x");
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("requests", "Requests", c);
        let g: Gauge = Gauge::default();
        g.set(7);
        r.register("depth", "Depth", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        r.register_with_unit("latency", "Latency", prometheus_client::registry::Unit::Seconds, h);
        let om = encode(&r);
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = text_format(&om);
        assert!(
            text.contains("# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE x_depth gauge\nx_depth 7\n"), "{text}");
        assert!(text.contains("x_latency_seconds_bucket{le=\"1.0\"} 1\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert_eq!(
            negotiate(Some("application/openmetrics-text;version=1.0.0"), om.clone()),
            (OPENMETRICS, om.clone())
        );
        assert_eq!(negotiate(None, om).0, TEXT);
    }
}
