//! The rate-limit center: permits for risky operations, freezes, and the circuit breaker.
//!
//! A permit is granted when no guard forbids it (a global or cluster freeze, a tripped breaker:
//! both let releases through) and the operation's policy for the cluster allows it (permits in
//! flight, permits per window, and for isolation the share of the cluster's nodes isolated at
//! once). Permits carry a lease; they end when released or when the lease expires. The breaker
//! trips when faults opened on more than `breaker_fault_share` of a cluster's nodes within
//! `breaker_window`, and stays tripped until a person resets it. Business-health gates
//! (`crate::gate`) deny like a freeze while they are closed. Every decision is an event, and
//! permits and guards are stored, so a restart of the center forgets none.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::{self as nktime, timestamp_to_unix_ms, to_unix_ms};
use nodekeeper_proto::v1::{ClusterGuard, ClusterLimits, Operation, Permit, PolicyUse, Severity};

use crate::config::PermitsConfig;
use crate::store::{NewEvent, Store, StoreError};

mod guards;

/// The operation named in configuration.
pub fn operation(name: &str) -> Option<Operation> {
    Some(match name {
        "isolate" => Operation::Isolate,
        "evict" => Operation::Evict,
        "reboot" => Operation::Reboot,
        "restart-component" => Operation::RestartComponent,
        "reinstall-component" => Operation::ReinstallComponent,
        "reinstall-os" => Operation::ReinstallOs,
        "hardware-repair" => Operation::HardwareRepair,
        "release" => Operation::Release,
        "upgrade" => Operation::Upgrade,
        _ => return None,
    })
}

pub fn operation_name(op: Operation) -> String {
    op.as_str_name().trim_start_matches("OPERATION_").to_ascii_lowercase().replace('_', "-")
}

/// What a caller is told.
pub enum Decision {
    Granted(Permit),
    Denied(String),
}

#[derive(Default)]
struct State {
    active: HashMap<String, Permit>,
    /// (cluster, operation, granted ms) of recent grants, for the per-window limits.
    recent: Vec<(String, i32, i64)>,
    /// By cluster; "" is the global freeze.
    guards: HashMap<String, ClusterGuard>,
}

/// Held while deciding (see `RateLimiter::deciding`); the database's lock goes with it.
struct Deciding<'a> {
    _one: tokio::sync::MutexGuard<'a, ()>,
    _db: crate::store::PermitsLock,
}

pub struct RateLimiter {
    config: PermitsConfig,
    state: Mutex<State>,
    /// Decisions are made one at a time: two concurrent requests cannot both take the last slot.
    decide: tokio::sync::Mutex<()>,
    gates: crate::gate::Gates,
    /// Notified when what the ops alerts show may have changed (a breaker tripped or reset, a
    /// fault escalated).
    pub changed: tokio::sync::Notify,
    /// Decisions by operation, decision and reason class (for `/metrics`).
    pub decisions: crate::metrics::CounterFamily,
}

fn event(
    cluster: &str,
    node: &str,
    kind: &str,
    message: String,
    severity: Severity,
    attributes: Vec<(&str, String)>,
) -> NewEvent {
    NewEvent::center_action("eventcenter/permits", cluster, node, kind, message, severity, attributes)
}

fn now_ms() -> i64 {
    to_unix_ms(SystemTime::now())
}

impl RateLimiter {
    pub async fn load(
        config: PermitsConfig,
        gates: crate::gate::Gates,
        store: &Store,
    ) -> Result<RateLimiter, StoreError> {
        let state = Self::read_state(&config, store).await?;
        Ok(RateLimiter {
            config,
            state: Mutex::new(state),
            decide: tokio::sync::Mutex::new(()),
            gates,
            changed: tokio::sync::Notify::new(),
            decisions: Default::default(),
        })
    }

    /// Permits, recent grants and guards as stored.
    async fn read_state(config: &PermitsConfig, store: &Store) -> Result<State, StoreError> {
        let longest = config.policy.iter().map(|p| p.window).max().unwrap_or_default().max(config.breaker_window);
        let since = now_ms() - longest.as_millis() as i64;
        let mut state = State::default();
        for (p, active) in store.permits_since(since).await? {
            let granted = p.granted_time.as_ref().map(timestamp_to_unix_ms).unwrap_or(0);
            state.recent.push((p.cluster.clone(), p.operation, granted));
            if active {
                state.active.insert(p.id.clone(), p);
            }
        }
        for g in store.guards().await? {
            state.guards.insert(g.cluster.clone(), g);
        }
        Ok(state)
    }

    /// On a store shared by several replicas, reads what the others decided (their permits and
    /// guards); alone on its store, this replica's memory is already the truth.
    pub async fn sync(&self, store: &Store) -> Result<(), StoreError> {
        if store.shared() {
            let state = Self::read_state(&self.config, store).await?;
            *self.state.lock().expect("permits lock") = state;
        }
        Ok(())
    }

    /// One decision at a time, in this replica and (on a shared store) across every replica:
    /// the guard holds the decision lock and the database's lock, and the state is read afresh
    /// under them, so two replicas never both take the last slot.
    async fn deciding(&self, store: &Store) -> Result<Deciding<'_>, StoreError> {
        let one = self.decide.lock().await;
        let db = store.lock_permits().await?;
        self.sync(store).await?;
        Ok(Deciding { _one: one, _db: db })
    }

    fn policy(&self, op: Operation, cluster: &str) -> Option<&crate::config::PermitPolicy> {
        let name = operation_name(op);
        let mine = self.config.policy.iter().find(|p| p.operation == name && p.cluster == cluster);
        mine.or_else(|| self.config.policy.iter().find(|p| p.operation == name && p.cluster == "*"))
    }

    /// Ends the permits whose lease passed; returns them.
    fn expire(&self) -> Vec<Permit> {
        let now = now_ms();
        let mut st = self.state.lock().expect("permits lock");
        let gone: Vec<String> = st
            .active
            .values()
            .filter(|p| p.lease_expiry_time.as_ref().is_some_and(|t| timestamp_to_unix_ms(t) <= now))
            .map(|p| p.id.clone())
            .collect();
        gone.iter().filter_map(|id| st.active.remove(id)).collect()
    }

    async fn store_expired(&self, store: &Store) -> Result<(), StoreError> {
        for p in self.expire() {
            let e = event(
                &p.cluster,
                &p.node,
                "PermitExpired",
                format!("permit {} for {} expired", p.id, operation_name(p.operation())),
                Severity::Warning,
                vec![("permit_id", p.id.clone())],
            );
            store.put_permits(vec![(p, false)], vec![e]).await?;
        }
        Ok(())
    }

    pub fn report_metric(&self, cluster: &str, name: &str, value: f64) {
        self.gates.report_metric(cluster, name, value);
    }

    /// Decides a request; the decision is stored as an event before it is answered.
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire(
        &self,
        store: &Store,
        holder: &str,
        op: Operation,
        cluster: &str,
        node: &str,
        fault_id: u64,
        lease: Option<Duration>,
    ) -> Result<Decision, StoreError> {
        let (mut granted, denied) =
            self.acquire_many(store, holder, op, cluster, &[(node.to_owned(), fault_id)], lease).await?;
        Ok(match (granted.pop(), denied) {
            (Some(p), _) => Decision::Granted(p),
            (None, reason) => Decision::Denied(reason.unwrap_or_default()),
        })
    }

    /// Why `op` would be denied in `cluster` now by a guard or a business gate (a freeze, the
    /// breaker, a closed gate), without asking for a permit.
    pub async fn held_back(&self, store: &Store, cluster: &str, op: Operation) -> Result<Option<String>, StoreError> {
        let gate = if op == Operation::Release { None } else { self.gates.closed(cluster).await };
        let _deciding = self.deciding(store).await?;
        self.check_breaker(store, cluster).await?;
        Ok(self.blocked(cluster, op).map(|(_, r)| r).or(gate))
    }

    /// Decides permits for several nodes (node, fault id) in order, as one decision: the ones
    /// granted before the first denial, and that denial's reason. Granted permits and the
    /// decisions' events are stored in one transaction before they are answered.
    pub async fn acquire_many(
        &self,
        store: &Store,
        holder: &str,
        op: Operation,
        cluster: &str,
        nodes: &[(String, u64)],
        lease: Option<Duration>,
    ) -> Result<(Vec<Permit>, Option<String>), StoreError> {
        // Gates may ask Alertmanager: outside the decision lock, which they take no slot under.
        let gate = if op == Operation::Release { None } else { self.gates.closed(cluster).await };
        let _deciding = self.deciding(store).await?;
        self.store_expired(store).await?;
        self.check_breaker(store, cluster).await?;
        let opname = operation_name(op);
        let blocked = self.blocked(cluster, op).or(gate.map(|g| ("gate", g)));
        let policy = self.policy(op, cluster);
        let nodes_in_cluster = match policy.and_then(|p| p.max_share) {
            Some(_) if blocked.is_none() => store.count_nodes(cluster.to_owned()).await?.max(1),
            _ => 1,
        };
        let lease = lease.unwrap_or(self.config.default_lease).min(self.config.max_lease);
        let now = SystemTime::now();
        let mut granted = Vec::new();
        let mut events = Vec::new();
        let mut denied = None;
        {
            let mut st = self.state.lock().expect("permits lock");
            for (node, fault_id) in nodes {
                let reason = blocked
                    .clone()
                    .or_else(|| Self::over_policy(&st, policy, &opname, op, cluster, node, nodes_in_cluster));
                if let Some((class, reason)) = reason {
                    self.count(&opname, "denied", class);
                    events.push(event(
                        cluster,
                        node,
                        "PermitDenied",
                        format!("{opname} for {holder} denied: {reason}"),
                        Severity::Warning,
                        vec![
                            ("operation", opname.clone()),
                            ("holder", holder.to_owned()),
                            ("fault_id", fault_id.to_string()),
                        ],
                    ));
                    denied = Some(reason);
                    break;
                }
                let permit = Permit {
                    id: format!("{:016x}", rand::random::<u64>()),
                    operation: op as i32,
                    cluster: cluster.to_owned(),
                    node: node.to_owned(),
                    fault_id: *fault_id,
                    holder: holder.to_owned(),
                    granted_time: Some(nktime::to_timestamp(now)),
                    lease_expiry_time: Some(nktime::to_timestamp(now + lease)),
                };
                events.push(event(
                    cluster,
                    node,
                    "PermitGranted",
                    format!(
                        "{opname} granted to {holder} for {} (permit {})",
                        humantime::format_duration(lease),
                        permit.id
                    ),
                    Severity::Info,
                    vec![
                        ("operation", opname.clone()),
                        ("holder", holder.to_owned()),
                        ("permit_id", permit.id.clone()),
                        ("fault_id", fault_id.to_string()),
                    ],
                ));
                self.count(&opname, "granted", "");
                st.recent.push((cluster.to_owned(), op as i32, to_unix_ms(now)));
                st.active.insert(permit.id.clone(), permit.clone());
                granted.push(permit);
            }
        }
        let rows = granted.iter().map(|p| (p.clone(), true)).collect();
        if let Err(e) = store.put_permits(rows, events).await {
            // Not stored, not granted.
            let mut st = self.state.lock().expect("permits lock");
            for p in &granted {
                st.active.remove(&p.id);
            }
            return Err(e);
        }
        Ok((granted, denied))
    }

    /// Why the policy of `op` in `cluster` forbids one more permit for `node`, if it does.
    #[allow(clippy::too_many_arguments)]
    fn over_policy(
        st: &State,
        policy: Option<&crate::config::PermitPolicy>,
        opname: &str,
        op: Operation,
        cluster: &str,
        node: &str,
        nodes_in_cluster: usize,
    ) -> Option<(&'static str, String)> {
        if let Some(p) = st.active.values().find(|p| p.cluster == cluster && p.node == node && p.operation == op as i32)
        {
            return Some(("node_holds_permit", format!("node {node} already holds permit {} for {opname}", p.id)));
        }
        let policy = policy?;
        let (in_flight, recent) = Self::usage(st, policy, op, cluster);
        if let Some(max) = policy.max_in_flight.filter(|m| in_flight >= *m) {
            return Some((
                "max_in_flight",
                format!("max in flight: {in_flight} {opname} permits held in cluster {cluster}, at most {max}"),
            ));
        }
        if let Some(max) = policy.max_per_window.filter(|m| recent >= *m) {
            return Some((
                "max_per_window",
                format!(
                    "max per window: {recent} {opname} permits granted in cluster {cluster} within {}, at most {max}",
                    humantime::format_duration(policy.window)
                ),
            ));
        }
        let share = policy.max_share?;
        if (in_flight + 1) as f64 / nodes_in_cluster as f64 > share {
            return Some((
                "max_share",
                format!(
                    "max share: {} of {nodes_in_cluster} nodes of cluster {cluster} would be isolated, at most {:.0}%",
                    in_flight + 1,
                    share * 100.0
                ),
            ));
        }
        None
    }

    /// Permits of `op` held in `cluster` now, and granted there within the policy's window.
    fn usage(st: &State, policy: &crate::config::PermitPolicy, op: Operation, cluster: &str) -> (u32, u32) {
        let in_flight = st.active.values().filter(|p| p.cluster == cluster && p.operation == op as i32).count() as u32;
        let since = now_ms() - policy.window.as_millis() as i64;
        let recent = st.recent.iter().filter(|(c, o, t)| c == cluster && *o == op as i32 && *t >= since).count() as u32;
        (in_flight, recent)
    }

    /// What limits `cluster` (of `nodes` nodes) now: each operation's policy with its use and
    /// whether it would deny one more permit, and each business gate's verdict.
    pub async fn limits(&self, cluster: &str, nodes: usize) -> ClusterLimits {
        let mut policies = Vec::new();
        {
            let st = self.state.lock().expect("permits lock");
            for op in (1..).map_while(|i| Operation::try_from(i).ok()) {
                let Some(policy) = self.policy(op, cluster) else { continue };
                let (in_flight, granted_in_window) = Self::usage(&st, policy, op, cluster);
                // No node holds a permit under the empty name: only the policy's limits answer.
                let denies = Self::over_policy(&st, Some(policy), &operation_name(op), op, cluster, "", nodes)
                    .map(|(_, why)| why)
                    .unwrap_or_default();
                policies.push(PolicyUse {
                    operation: op as i32,
                    policy_cluster: policy.cluster.clone(),
                    max_in_flight: policy.max_in_flight,
                    in_flight,
                    max_per_window: policy.max_per_window,
                    granted_in_window,
                    window: Some(nktime::to_duration(policy.window)),
                    max_share: policy.max_share,
                    denies,
                });
            }
        }
        let gates = self.gates.verdicts(cluster).await;
        ClusterLimits { cluster: cluster.to_owned(), nodes: nodes as u32, policies, gates }
    }

    /// The breaker's rule: (fault share, window).
    fn count(&self, operation: &str, decision: &'static str, reason: &'static str) {
        let labels =
            vec![("operation", operation.to_owned()), ("decision", decision.to_owned()), ("reason", reason.to_owned())];
        self.decisions.get_or_create(&labels).inc();
    }

    /// Ends a permit. Ok(None): no such active permit.
    pub async fn release(
        &self,
        store: &Store,
        id: &str,
        success: bool,
        by: &str,
    ) -> Result<Option<Permit>, StoreError> {
        Ok(self.release_many(store, &[(id.to_owned(), success)], by).await?.pop())
    }

    /// Ends permits (id, success) in one transaction; returns those that were active.
    pub async fn release_many(
        &self,
        store: &Store,
        ids: &[(String, bool)],
        by: &str,
    ) -> Result<Vec<Permit>, StoreError> {
        let _deciding = self.deciding(store).await?;
        let mut ended = Vec::new();
        let mut events = Vec::new();
        {
            let mut st = self.state.lock().expect("permits lock");
            for (id, success) in ids {
                let Some(p) = st.active.remove(id) else { continue };
                events.push(event(
                    &p.cluster,
                    &p.node,
                    "PermitReleased",
                    format!(
                        "permit {id} for {} released by {by} ({})",
                        operation_name(p.operation()),
                        if *success { "succeeded" } else { "failed" }
                    ),
                    Severity::Info,
                    vec![("permit_id", id.to_owned()), ("success", success.to_string())],
                ));
                ended.push(p);
            }
        }
        if ended.is_empty() {
            return Ok(ended);
        }
        let rows = ended.iter().map(|p| (p.clone(), false)).collect();
        if let Err(e) = store.put_permits(rows, events).await {
            let mut st = self.state.lock().expect("permits lock");
            for p in &ended {
                st.active.insert(p.id.clone(), p.clone());
            }
            return Err(e);
        }
        Ok(ended)
    }

    /// The active permit `id` if it allows `op` on `node` of `cluster` now.
    pub fn check(&self, id: &str, op: Operation, cluster: &str, node: &str) -> Result<Permit, String> {
        let st = self.state.lock().expect("permits lock");
        let p = st.active.get(id).ok_or_else(|| format!("permit {id:?} was not granted, or is no longer active"))?;
        if p.operation != op as i32 || p.cluster != cluster || p.node != node {
            return Err(format!(
                "permit {id} is for {} on node {} of cluster {}, not {} on {node}",
                operation_name(p.operation()),
                p.node,
                p.cluster,
                operation_name(op)
            ));
        }
        if p.lease_expiry_time.as_ref().is_some_and(|t| timestamp_to_unix_ms(t) <= now_ms()) {
            return Err(format!("permit {id} expired"));
        }
        Ok(p.clone())
    }

    /// The active permit `id`, whatever it is for.
    pub fn check_any(&self, id: &str) -> Result<Permit, String> {
        self.state
            .lock()
            .expect("permits lock")
            .active
            .get(id)
            .cloned()
            .ok_or_else(|| format!("no active permit {id:?}"))
    }

    pub fn active(&self, clusters: &[String]) -> Vec<Permit> {
        let st = self.state.lock().expect("permits lock");
        let mut v: Vec<Permit> =
            st.active.values().filter(|p| clusters.is_empty() || clusters.contains(&p.cluster)).cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}
