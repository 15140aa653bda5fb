//! The agent's Prometheus metrics, served as text on the status listener's `/metrics`.

use std::sync::atomic::AtomicU64;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
    /// Monitor threads (name, thread id): their CPU time is read from /proc when scraped.
    pub monitor_threads: Arc<Mutex<Vec<(String, i32)>>>,
    /// CPU seconds spent in each periodic check (measured around each run).
    pub check_cpu: Arc<Mutex<BTreeMap<&'static str, f64>>>,
}

/// CPU seconds (user + system) of one of this process's threads.
fn thread_cpu_seconds(tid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    Some(ticks / hz)
}

/// CPU time of the calling thread.
pub fn thread_cpu_now() -> std::time::Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| std::time::Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
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
        registry.register(
            "outbox_rejected",
            "Observations the center refused as invalid, since the state was created",
            gauge(stats.rejected_total),
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
        let cpu = Family::<Vec<(&'static str, String)>, Counter<f64, AtomicU64>>::default();
        for (name, tid) in self.monitor_threads.lock().expect("metrics lock").iter() {
            if let Some(secs) = thread_cpu_seconds(*tid) {
                cpu.get_or_create(&vec![("monitor", name.clone())]).inc_by(secs);
            }
        }
        for (name, secs) in self.check_cpu.lock().expect("metrics lock").iter() {
            cpu.get_or_create(&vec![("monitor", format!("check/{name}"))]).inc_by(*secs);
        }
        registry.register_with_unit(
            "monitor_cpu",
            "CPU time spent by each log monitor thread and periodic check",
            prometheus_client::registry::Unit::Seconds,
            cpu,
        );
        nodekeeper_common::metrics::encode(&registry)
    }
}
