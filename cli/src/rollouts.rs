//! `nodekeeper rollouts`: fleet rollouts of node components from a TOML file
//! (`packaging/rollout.toml`), listed, shown with each node's phase and the timeline, and
//! controlled (pause, resume, abort, rollback).

use std::path::Path;
use std::time::Duration;

use nodekeeper_agent::components::spec::{TomlComponent, from_toml};
use nodekeeper_proto::v1::{
    ControlRolloutRequest, CreateRolloutRequest, GetRolloutRequest, ListRolloutsRequest, MaintenanceWindow, Rollout,
    RolloutControl, RolloutFailureAction, RolloutNodePhase, RolloutPhase, RolloutSpec, RolloutStrategy,
    rollout_service_client::RolloutServiceClient,
};
use serde::Deserialize;
use tonic::Status;
use tonic::transport::Channel;

use crate::connect::status;
use crate::output::{self, enum_name, json_line, table, time};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutFile {
    name: String,
    cluster: String,
    selector: String,
    strategy: StrategyFile,
    #[serde(default)]
    component: Vec<TomlComponent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyFile {
    waves: Vec<String>,
    #[serde(default)]
    max_parallel: Option<u32>,
    #[serde(default, with = "nodekeeper_common::config::duration::option")]
    bake: Option<Duration>,
    #[serde(default)]
    window: Vec<WindowFile>,
    #[serde(default)]
    drain: bool,
    #[serde(default)]
    failure_budget: Option<String>,
    #[serde(default)]
    on_failure: Option<String>,
    #[serde(default, with = "nodekeeper_common::config::duration::option")]
    node_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    #[serde(default)]
    days: Vec<String>,
    start: String,
    end: String,
    #[serde(default)]
    time_zone: String,
}

/// Reads a rollout file: unknown keys and bad components are errors naming the file and line.
pub fn load(path: &Path) -> Result<RolloutSpec, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read rollout file {}: {e}", path.display()))?;
    let f: RolloutFile = nodekeeper_common::config::parse(path, &text).map_err(|e| e.to_string())?;
    let (components, _) = from_toml(path, &text, f.component)?;
    let on_failure = match f.strategy.on_failure.as_deref() {
        None | Some("halt") => RolloutFailureAction::Halt,
        Some("rollback") => RolloutFailureAction::Rollback,
        Some(other) => {
            return Err(format!(
                "{}: strategy.on_failure {other:?}: expected \"halt\" or \"rollback\"",
                path.display()
            ));
        }
    };
    Ok(RolloutSpec {
        name: f.name,
        cluster: f.cluster,
        selector: f.selector,
        components,
        strategy: Some(RolloutStrategy {
            waves: f.strategy.waves,
            max_parallel: f.strategy.max_parallel.unwrap_or(1),
            bake: f.strategy.bake.map(nodekeeper_common::time::to_duration),
            windows: f
                .strategy
                .window
                .into_iter()
                .map(|w| MaintenanceWindow { days: w.days, start: w.start, end: w.end, time_zone: w.time_zone })
                .collect(),
            drain: f.strategy.drain,
            failure_budget: f.strategy.failure_budget.unwrap_or_default(),
            on_failure: on_failure as i32,
            node_timeout: f.strategy.node_timeout.map(nodekeeper_common::time::to_duration),
        }),
    })
}

/// A rollout of thousands of nodes, with its timeline, is several MB: more than gRPC's default
/// 4 MiB a message.
fn client(ch: Channel) -> RolloutServiceClient<Channel> {
    RolloutServiceClient::new(ch).max_decoding_message_size(256 << 20)
}

fn phase(r: &Rollout) -> String {
    enum_name(r.phase().as_str_name(), "ROLLOUT_PHASE_")
}

/// "2 of 3 (25%)", and until when it bakes.
fn wave(r: &Rollout, waves: &[String]) -> String {
    let size = waves.get(r.wave as usize).cloned().unwrap_or_default();
    let mut out = format!("{} of {} ({size})", r.wave + 1, waves.len());
    let running = matches!(r.phase(), RolloutPhase::Progressing | RolloutPhase::Waiting);
    if let Some(t) = r.bake_until.as_ref().filter(|_| running) {
        out.push_str(&format!(", baking until {}", time(Some(t))));
    }
    out
}

/// "changed/total" of a rollout's nodes.
fn progress(r: &Rollout) -> String {
    let changed = r.nodes.iter().filter(|n| n.phase() == RolloutNodePhase::Changed).count();
    format!("{changed}/{}", r.nodes.len())
}

pub async fn create(ch: Channel, json: bool, file: &Path) -> anyhow::Result<()> {
    let spec = load(file).map_err(|e| status(Status::invalid_argument(e)))?;
    let r = client(ch).create_rollout(CreateRolloutRequest { spec: Some(spec) }).await.map_err(status)?.into_inner();
    if json {
        return json_line("nodekeeper.v1.Rollout", &r);
    }
    let spec = r.spec.clone().unwrap_or_default();
    let waves = spec.strategy.clone().unwrap_or_default().waves;
    let per_wave: Vec<String> = (0..waves.len())
        .map(|w| format!("{}: {}", waves[w], r.nodes.iter().filter(|n| n.wave == w as u32).count()))
        .collect();
    output::println(&format!(
        "rollout {} created: {} node(s) in waves {}",
        spec.name,
        r.nodes.len(),
        per_wave.join(", ")
    ))?;
    Ok(())
}

pub async fn list(ch: Channel, json: bool, clusters: Vec<String>) -> anyhow::Result<()> {
    let rollouts = client(ch).list_rollouts(ListRolloutsRequest { clusters }).await.map_err(status)?.into_inner();
    if json {
        for r in &rollouts.rollouts {
            json_line("nodekeeper.v1.Rollout", r)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = rollouts
        .rollouts
        .iter()
        .map(|r| {
            let spec = r.spec.clone().unwrap_or_default();
            let waves = spec.strategy.map(|s| s.waves.len()).unwrap_or_default();
            vec![
                spec.name,
                spec.cluster,
                spec.selector,
                phase(r),
                format!("{}/{waves}", (r.wave as usize + 1).min(waves)),
                progress(r),
                time(r.created_time.as_ref()),
            ]
        })
        .collect();
    table(&["NAME", "CLUSTER", "SELECTOR", "PHASE", "WAVE", "CHANGED", "CREATED"], &rows)?;
    Ok(())
}

pub async fn show(ch: Channel, json: bool, name: String) -> anyhow::Result<()> {
    let resp = client(ch).get_rollout(GetRolloutRequest { name }).await.map_err(status)?.into_inner();
    if json {
        return json_line("nodekeeper.v1.GetRolloutResponse", &resp);
    }
    let r = resp.rollout.unwrap_or_default();
    let spec = r.spec.clone().unwrap_or_default();
    let strategy = spec.strategy.clone().unwrap_or_default();
    let components: Vec<String> = spec.components.iter().map(|c| format!("{} {}", c.name, c.version)).collect();
    let bake = strategy.bake.as_ref().map(|d| format!("{}s", d.seconds)).unwrap_or_else(|| "0s".into());
    let fields = [
        ("Rollout", spec.name.clone()),
        ("Cluster", spec.cluster.clone()),
        ("Selector", spec.selector.clone()),
        ("Components", components.join(", ")),
        ("Waves", strategy.waves.join(", ")),
        ("Parallel", strategy.max_parallel.to_string()),
        ("Bake", bake),
        ("On failure", enum_name(strategy.on_failure().as_str_name(), "ROLLOUT_FAILURE_ACTION_")),
        ("Drain", if strategy.drain { "cordon and drain each node" } else { "no" }.into()),
        ("Phase", phase(&r)),
        ("Wave", wave(&r, &strategy.waves)),
        ("Reason", r.reason.clone()),
        ("Changed", progress(&r)),
        ("Created", format!("{} by {}", time(r.created_time.as_ref()), r.created_by)),
    ];
    output::fields(&fields, 11, &["Reason"])?;
    output::println("Nodes:")?;
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                strategy.waves.get(n.wave as usize).cloned().unwrap_or_default(),
                enum_name(n.phase().as_str_name(), "ROLLOUT_NODE_PHASE_"),
                n.reason.clone(),
            ]
        })
        .collect();
    table(&["NODE", "WAVE", "PHASE", "REASON"], &rows)?;
    output::println("")?;
    output::println("Timeline:")?;
    table(&crate::cmd::EVENT_HEADER, &resp.events.iter().map(crate::cmd::event_row).collect::<Vec<_>>())?;
    Ok(())
}

pub async fn control(
    ch: Channel,
    json: bool,
    name: String,
    control: RolloutControl,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let request = ControlRolloutRequest { name, control: control as i32, reason: reason.unwrap_or_default() };
    let r = client(ch).control_rollout(request).await.map_err(status)?.into_inner();
    if json {
        return json_line("nodekeeper.v1.Rollout", &r);
    }
    let name = r.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    output::println(&format!("rollout {name}: {} ({})", phase(&r), r.reason))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/rollout.toml");
        let spec = load(&path).unwrap();
        let strategy = spec.strategy.unwrap();
        assert_eq!(strategy.waves, ["1", "5%", "25%", "100%"]);
        assert_eq!(strategy.on_failure(), RolloutFailureAction::Rollback);
        assert_eq!(strategy.windows[0].time_zone, "Europe/Berlin");
        assert_eq!(spec.components[0].with_packages[0].package, "kubectl");
    }
}
