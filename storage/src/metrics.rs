//! `/metrics`: each target's list size, the entries waiting out their grace, changes, errors and
//! whether the guard holds it.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
pub struct Metrics {
    entries: Family<Labels, Gauge>,
    waiting: Family<Labels, Gauge>,
    held: Family<Labels, Gauge>,
    pass_seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    changes: Family<Labels, Counter>,
    passes: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
}

fn target(t: &str) -> Labels {
    vec![("target", t.to_owned())]
}

impl Metrics {
    /// A pass ended: the list's size after it, what waits out its grace, whether the guard holds.
    pub fn set(&self, t: &str, entries: usize, waiting: usize, held: bool, took: std::time::Duration) {
        self.pass_seconds.get_or_create(&target(t)).set(took.as_secs_f64());
        self.entries.get_or_create(&target(t)).set(entries as i64);
        self.waiting.get_or_create(&target(t)).set(waiting as i64);
        self.held.get_or_create(&target(t)).set(held as i64);
        self.passes.get_or_create(&target(t)).inc();
    }

    pub fn changed(&self, t: &str, op: &str) {
        self.changes.get_or_create(&vec![("target", t.to_owned()), ("op", op.to_owned())]).inc();
    }

    pub fn error(&self, t: &str) {
        self.errors.get_or_create(&target(t)).inc();
    }

    pub fn render(&self) -> String {
        let mut r = Registry::with_prefix("nodekeeper_storage");
        r.register("entries", "Entries of the kind the target manages on its list", self.entries.clone());
        r.register("waiting", "Entries no node wants, kept while their grace runs", self.waiting.clone());
        r.register("guard_held", "1 while the guard holds the target's removals back", self.held.clone());
        r.register(
            "pass_seconds",
            "How long the last pass took (read, plan, apply, record)",
            self.pass_seconds.clone(),
        );
        r.register("passes", "Passes that read the target and applied their plan", self.passes.clone());
        r.register("changes", "Entries added or removed", self.changes.clone());
        r.register("errors", "Passes that could not read or change the target", self.errors.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap_or_default();
        out
    }
}
