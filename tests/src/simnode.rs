//! A simulated node for rollout tests and benchmarks: a hand-driven agent stream that sends
//! heartbeats and answers each desired state the center sends with a component status report,
//! converged at the desired versions, or failed (rolled back) for versions marked broken.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodekeeper_proto::v1::{
    AgentMessage, ComponentPhase, ComponentStatus, ComponentStatusReport, DesiredState, Heartbeat, Hello,
    agent_message, center_message,
};

/// What the simulated nodes saw: (node, when, the desired state).
pub type Seen = Arc<Mutex<Vec<(String, SystemTime, DesiredState)>>>;

/// Settings shared by simulated nodes.
#[derive(Clone)]
pub struct Sim {
    pub url: String,
    pub heartbeat: Duration,
    /// Versions whose change fails (the node reports the component failed and rolled back).
    pub broken: Arc<Mutex<HashSet<String>>>,
    pub seen: Seen,
    /// Streams opened (welcomed) so far.
    pub connected: Arc<std::sync::atomic::AtomicUsize>,
}

impl Sim {
    pub fn new(url: String, heartbeat: Duration) -> Sim {
        Sim { url, heartbeat, broken: Arc::default(), seen: Arc::default(), connected: Arc::default() }
    }

    /// Runs one node until the center ends its stream; connects again after that.
    pub async fn run(self, mut hello: Hello) {
        hello.heartbeat_interval = Some(nodekeeper_common::time::to_duration(self.heartbeat));
        let node = hello.node.clone();
        let mut installed: Vec<(String, String)> = Vec::new();
        loop {
            let Ok(conn) = crate::AgentConn::connect(&self.url, hello.clone()).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            self.connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (tx, mut rx) = conn.into_parts();
            let mut tick = tokio::time::interval(self.heartbeat);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let hb = AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat::default())) };
                        if tx.send(hb).await.is_err() {
                            break;
                        }
                    }
                    m = rx.message() => match m {
                        Ok(Some(m)) => {
                            let Some(center_message::Msg::DesiredState(d)) = m.msg else { continue };
                            self.seen.lock().unwrap().push((node.clone(), SystemTime::now(), d.clone()));
                            let report = self.report(&d, &mut installed);
                            let msg = AgentMessage { msg: Some(agent_message::Msg::ComponentStatus(report)) };
                            if tx.send(msg).await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    },
                }
            }
        }
    }

    /// The status after applying `d`: each component at its version, or, for a broken version,
    /// failed and left at what was installed.
    fn report(&self, d: &DesiredState, installed: &mut Vec<(String, String)>) -> ComponentStatusReport {
        let broken = self.broken.lock().unwrap();
        let mut components = Vec::new();
        for c in &d.components {
            let before = installed.iter().find(|(n, _)| n == &c.name).map(|(_, v)| v.clone()).unwrap_or_default();
            let (phase, now, error) = if broken.contains(&c.version) {
                (ComponentPhase::Failed, before, format!("{} {} was rolled back: not healthy", c.name, c.version))
            } else {
                (ComponentPhase::Converged, format!("0:{}", c.version), String::new())
            };
            installed.retain(|(n, _)| n != &c.name);
            installed.push((c.name.clone(), now.clone()));
            components.push(ComponentStatus {
                name: c.name.clone(),
                desired_version: c.version.clone(),
                installed_version: now,
                phase: phase as i32,
                last_error: error,
                ..Default::default()
            });
        }
        ComponentStatusReport { components, generation: d.generation }
    }
}
