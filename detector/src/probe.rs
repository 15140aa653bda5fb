//! One probe of one node: TCP connect to the agent's status port and its gRPC health, TCP
//! connect to the kubelet's port. A refused connection is an answer (the host is up); a timeout
//! or an unreachable route is none.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub cluster: String,
    pub node: String,
    pub addr: IpAddr,
    pub status_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Ok,
    Refused,
    NoAnswer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub agent: Reach,
    /// The agent's gRPC health service answered SERVING.
    pub agent_healthy: bool,
    pub kubelet: Option<Reach>,
    pub latency: Duration,
}

impl ProbeResult {
    pub fn evidence(&self) -> String {
        let r = |x: Reach| match x {
            Reach::Ok => "connected",
            Reach::Refused => "refused",
            Reach::NoAnswer => "no answer",
        };
        let mut s = format!(
            "agent port {}, agent health {}",
            r(self.agent),
            if self.agent_healthy { "serving" } else { "not serving" }
        );
        if let Some(k) = self.kubelet {
            s.push_str(&format!(", kubelet port {}", r(k)));
        }
        s.push_str(&format!(", {} ms", self.latency.as_millis()));
        s
    }
}

pub async fn connect(addr: SocketAddr, timeout: Duration) -> Reach {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Reach::Ok,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
        _ => Reach::NoAnswer,
    }
}

async fn agent_health(addr: SocketAddr, timeout: Duration) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else { return false };
    let check = async {
        let channel = endpoint.connect_timeout(timeout).timeout(timeout).connect().await.ok()?;
        let r = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(r.into_inner().status() == ServingStatus::Serving)
    };
    tokio::time::timeout(timeout, check).await.ok().flatten().unwrap_or(false)
}

pub async fn probe(t: &Target, kubelet_port: u16, timeout: Duration) -> ProbeResult {
    let start = Instant::now();
    let agent_addr = SocketAddr::new(t.addr, t.status_port);
    let kubelet = async {
        if kubelet_port == 0 { None } else { Some(connect(SocketAddr::new(t.addr, kubelet_port), timeout).await) }
    };
    let agent = async {
        let reach = connect(agent_addr, timeout).await;
        let healthy = reach == Reach::Ok && agent_health(agent_addr, timeout).await;
        (reach, healthy)
    };
    let ((agent, agent_healthy), kubelet) = tokio::join!(agent, kubelet);
    ProbeResult { agent, agent_healthy, kubelet, latency: start.elapsed() }
}
