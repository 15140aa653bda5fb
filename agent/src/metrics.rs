//! The agent's Prometheus metrics, served as text on the status listener's `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::outbox::Outbox;

/// Counters the connection updates; outbox gauges are read from the outbox when scraped.
#[derive(Default, Clone)]
pub struct Metrics {
    pub sent: Counter,
    pub acked: Counter,
    pub reconnects: Counter,
    pub connected: Gauge,
    /// Log lines read by the log monitors.
    pub log_lines: Counter,
    /// Log lines dropped unmatched because a monitor was over its budget.
    pub log_lines_dropped: Counter,
    /// Rule matches in log lines.
    pub log_matches: Counter,
}

impl Metrics {
    /// The text exposition of every metric, with the outbox read now.
    pub fn render(&self, outbox: &Outbox) -> String {
        let stats = outbox.stats();
        let mut registry = Registry::with_prefix("nodekeeper_agent");
        let gauge = |v: u64| {
            let g: Gauge<u64, AtomicU64> = Gauge::default();
            g.set(v);
            g
        };
        registry.register("outbox_depth", "Observations waiting for the center's acknowledgement", gauge(stats.depth));
        registry.register("outbox_bytes", "Bytes of observations in the outbox", gauge(stats.bytes));
        registry.register(
            "outbox_dropped",
            "Observations dropped because the outbox was full, since the state was created",
            gauge(stats.dropped_total),
        );
        registry.register("last_sequence", "Highest sequence number assigned", gauge(stats.last_sequence));
        registry.register("observations_sent", "Observations sent to the center", self.sent.clone());
        registry.register("observations_acked", "Observations the center acknowledged", self.acked.clone());
        registry.register("reconnects", "Connections opened to the center", self.reconnects.clone());
        registry.register("connected", "1 while a stream to the center is open", self.connected.clone());
        registry.register("log_lines", "Log lines read by the log monitors", self.log_lines.clone());
        registry.register(
            "log_lines_dropped",
            "Log lines dropped unmatched because a monitor was over its line budget",
            self.log_lines_dropped.clone(),
        );
        registry.register("log_matches", "Rule matches in log lines", self.log_matches.clone());
        let mut out = String::new();
        if let Err(err) = encode(&mut out, &registry) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        out
    }
}
