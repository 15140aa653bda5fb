//! Component monitors: for each configured component (default containerd, docker, kubelet), its
//! systemd unit (state and restarts, from `systemctl show`), its health endpoint and its runtime
//! socket.
//!
//! - A unit that is not installed makes the component *absent*: reported once as an informational
//!   `ComponentAbsent` event (and `ComponentPresent` when it appears), never as a failure.
//! - `<Name>Unhealthy` (e.g. `KubeletUnhealthy`) is True while the unit is not active, the health
//!   endpoint does not answer 2xx, or the socket does not answer.
//! - `Frequent<Name>Restart` (e.g. `FrequentKubeletRestart`) is True while the unit started at
//!   least `restart_count` times within `restart_window` (default 5 in 20 minutes). Starts are
//!   counted from changes of the unit's invocation id and of its automatic-restart counter.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{Category, ConditionStatus, RecommendedAction, Severity};
use serde::Deserialize;

use super::rules::{Clear, ConditionDef};
use super::state::Reporter;
use super::{Class, Finding};

const SOURCE: &str = "component-monitor";

/// One component to watch (agent configuration, `[[monitors.components.watch]]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComponentWatch {
    pub name: String,
    pub unit: String,
    /// An HTTP URL that must answer 2xx, e.g. kubelet's http://127.0.0.1:10248/healthz.
    #[serde(default)]
    pub health_url: Option<String>,
    /// A unix socket that must accept a connection, e.g. /run/containerd/containerd.sock.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// If set, an HTTP GET of this path over the socket must answer 2xx (docker: "/_ping").
    #[serde(default)]
    pub socket_http_path: Option<String>,
}

pub fn default_components() -> Vec<ComponentWatch> {
    vec![
        ComponentWatch {
            name: "containerd".into(),
            unit: "containerd.service".into(),
            health_url: None,
            socket: Some("/run/containerd/containerd.sock".into()),
            socket_http_path: None,
        },
        ComponentWatch {
            name: "docker".into(),
            unit: "docker.service".into(),
            health_url: None,
            socket: Some("/var/run/docker.sock".into()),
            socket_http_path: Some("/_ping".into()),
        },
        ComponentWatch {
            name: "kubelet".into(),
            unit: "kubelet.service".into(),
            health_url: Some("http://127.0.0.1:10248/healthz".into()),
            socket: None,
            socket_http_path: None,
        },
    ]
}

/// "kubelet" → "Kubelet", "node-exporter" → "NodeExporter": the component's part of its
/// condition types.
pub fn title(name: &str) -> String {
    name.split(['-', '_', '.'])
        .map(|part| {
            let mut c = part.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
        })
        .collect()
}

/// Properties of `systemctl show` (KEY=value lines).
pub fn parse_show(text: &str) -> HashMap<String, String> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    pub systemctl: PathBuf,
    pub timeout: Duration,
    pub restart_count: usize,
    pub restart_window: Duration,
}

struct Tracked {
    watch: ComponentWatch,
    present: Option<bool>,
    invocation: Option<String>,
    n_restarts: Option<u64>,
    starts: VecDeque<Instant>,
}

/// Runs the component checks until cancelled.
pub async fn run(
    watch: Vec<ComponentWatch>,
    s: Settings,
    reporter: Reporter,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tracked: Vec<Tracked> = watch
        .into_iter()
        .map(|w| Tracked { watch: w, present: None, invocation: None, n_restarts: None, starts: VecDeque::new() })
        .collect();
    for t in &mut tracked {
        for d in conditions(&t.watch.name) {
            reporter.declare(&d);
        }
        t.present = reporter.state(&presence_key(&t.watch.name)).ok().flatten().map(|v| v == b"1");
    }
    let mut delay = super::first_delay(s.interval);
    // The components whose unit could not be read and why, as last logged.
    let mut reported: Option<(Vec<String>, String)> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = super::jittered(s.interval);
        let mut unreadable: Vec<String> = Vec::new();
        let mut why = String::new();
        for t in &mut tracked {
            let props = match show(&s.systemctl, &t.watch.unit, s.timeout).await {
                Ok(p) => p,
                Err(err) => {
                    unreadable.push(t.watch.name.clone());
                    why = err;
                    continue;
                }
            };
            let (findings, presence) = check(t, &s, &props).await;
            let extra: Vec<(String, Option<Vec<u8>>)> = presence
                .map(|p| (presence_key(&t.watch.name), Some(if p { b"1".to_vec() } else { b"0".to_vec() })))
                .into_iter()
                .collect();
            let r = reporter.clone();
            let result = tokio::task::spawn_blocking(move || r.report_blocking(&findings, &extra)).await;
            if let Ok(Err(err)) = result {
                tracing::error!(component = %t.watch.name, error = %err, "cannot store component findings");
            }
        }
        // One line for the monitor, not one per component: without systemd (a container, a
        // development machine) every unit fails the same way.
        let now = (!unreadable.is_empty()).then_some((unreadable, why));
        if now != reported {
            match &now {
                Some((names, why)) => tracing::warn!(
                    components = %names.join(","),
                    error = %why,
                    "cannot read the units' state; these components are not checked until it can be read (retrying quietly)"
                ),
                None => tracing::info!("the units' state can be read again"),
            }
            reported = now;
        }
    }
}

fn presence_key(name: &str) -> String {
    format!("component/{name}/present")
}

pub fn conditions(name: &str) -> Vec<ConditionDef> {
    let t = title(name);
    vec![
        ConditionDef {
            kind: format!("{t}Unhealthy"),
            reason: format!("{t}IsHealthy"),
            message: format!("{name} is functioning properly"),
            clear: Clear::Never,
        },
        ConditionDef {
            kind: format!("Frequent{t}Restart"),
            reason: format!("NoFrequent{t}Restart"),
            message: format!("{name} is not restarting frequently"),
            clear: Clear::Never,
        },
    ]
}

/// One round for one component: its findings, and its presence if that changed.
async fn check(t: &mut Tracked, s: &Settings, props: &HashMap<String, String>) -> (Vec<Finding>, Option<bool>) {
    let name = t.watch.name.clone();
    let info = Class::new(Severity::Info, Category::Component, RecommendedAction::None);
    let present = props.get("LoadState").is_some_and(|l| l != "not-found");
    let mut out = Vec::new();
    let mut presence = None;
    if t.present != Some(present) {
        presence = Some(present);
        let (reason, msg) = if present {
            ("ComponentPresent", format!("{name} ({}) is installed", t.watch.unit))
        } else {
            ("ComponentAbsent", format!("{name} ({}) is not installed on this node; it is not monitored", t.watch.unit))
        };
        out.push(Finding::temporary(SOURCE, reason, msg, info).with("component", &name));
        t.present = Some(present);
    }
    if !present {
        return (out, presence);
    }
    let defs = conditions(&name);
    let class = Class::new(Severity::Error, Category::Component, RecommendedAction::RestartComponent);
    // Starts: a new invocation id is a start; the automatic-restart counter counts the ones in
    // between checks.
    let now = Instant::now();
    let invocation = props.get("InvocationID").filter(|v| !v.is_empty()).cloned();
    let n_restarts = props.get("NRestarts").and_then(|v| v.parse::<u64>().ok());
    let mut new_starts = 0;
    if let (Some(prev), Some(cur)) = (&t.invocation, &invocation)
        && prev != cur
    {
        new_starts = 1;
    }
    if let (Some(prev), Some(cur)) = (t.n_restarts, n_restarts)
        && cur > prev
    {
        new_starts = new_starts.max((cur - prev) as usize);
    }
    if invocation.is_some() {
        t.invocation = invocation;
    }
    if n_restarts.is_some() {
        t.n_restarts = n_restarts;
    }
    for _ in 0..new_starts {
        t.starts.push_back(now);
    }
    while t.starts.front().is_some_and(|s0| now.duration_since(*s0) > s.restart_window) {
        t.starts.pop_front();
    }
    let frequent = t.starts.len() >= s.restart_count;
    out.push(if frequent {
        Finding::condition(
            SOURCE,
            &defs[1].kind,
            ConditionStatus::True,
            &defs[1].kind,
            format!("{name} started {} times within {}", t.starts.len(), humantime::format_duration(s.restart_window)),
            class,
        )
    } else {
        Finding::condition(
            SOURCE,
            &defs[1].kind,
            ConditionStatus::False,
            &defs[1].reason,
            defs[1].message.clone(),
            class,
        )
    });
    let mut problems = Vec::new();
    let active = props.get("ActiveState").map(String::as_str).unwrap_or("unknown");
    if !matches!(active, "active" | "activating" | "reloading") {
        problems.push(format!(
            "unit {} is {active} ({})",
            t.watch.unit,
            props.get("SubState").map(String::as_str).unwrap_or("")
        ));
    }
    if active == "active" {
        if let Some(url) = &t.watch.health_url
            && let Err(e) = nodekeeper_common::http::get(url, s.timeout).await
        {
            problems.push(format!("health check {url}: {e}"));
        }
        if let Some(sock) = &t.watch.socket
            && let Err(e) = socket_check(sock, t.watch.socket_http_path.as_deref(), s.timeout).await
        {
            problems.push(format!("socket {}: {e}", sock.display()));
        }
    }
    out.push(if problems.is_empty() {
        Finding::condition(
            SOURCE,
            &defs[0].kind,
            ConditionStatus::False,
            &defs[0].reason,
            defs[0].message.clone(),
            class,
        )
    } else {
        Finding::condition(SOURCE, &defs[0].kind, ConditionStatus::True, &defs[0].kind, problems.join("; "), class)
    });
    for f in &mut out {
        f.attributes.retain(|(k, _)| k != "component");
        f.attributes.push(("component".into(), name.clone()));
    }
    (out, presence)
}

async fn show(systemctl: &PathBuf, unit: &str, timeout: Duration) -> Result<HashMap<String, String>, String> {
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::new(systemctl)
            .args(["show", unit, "--property=LoadState,ActiveState,SubState,NRestarts,InvocationID"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{} show timed out", systemctl.display()))?
    .map_err(|e| format!("cannot run {}: {e}", systemctl.display()))?;
    if !out.status.success() {
        // Without the unit's name: the same failure for every unit reads as one.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = stderr.lines().next().unwrap_or_default().trim();
        return Err(format!("{} show exited with {}: {said}", systemctl.display(), out.status));
    }
    Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
}

async fn socket_check(path: &std::path::Path, http_path: Option<&str>, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, async {
        let s = tokio::net::UnixStream::connect(path).await.map_err(|e| e.to_string())?;
        match http_path {
            Some(p) => nodekeeper_common::http::request(s, "localhost", p).await,
            None => Ok(()),
        }
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_show_output() {
        assert_eq!(conditions("kubelet")[0].kind, "KubeletUnhealthy");
        assert_eq!(conditions("containerd")[1].kind, "FrequentContainerdRestart");
        let p = parse_show("LoadState=loaded\nActiveState=active\nSubState=running\nNRestarts=3\nInvocationID=abc\n");
        assert_eq!(p["NRestarts"], "3");
        assert_eq!(p["ActiveState"], "active");
    }
}
