//! One probe of one node: TCP connect to the agent's status port and its gRPC health, TCP
//! connect to the kubelet's port, a GET of the kubelet's `/healthz` where its port is configured,
//! and an ICMP echo where enabled. A refused connection is an
//! answer (the host is up); a timeout or an unreachable route is none. The echo tells a node whose
//! ports are filtered from one that is gone.
//!
//! The background sweep's probe is light: the agent's port accepting a connection counts as a
//! healthy agent. The gRPC health check and the echo are for suspects (heartbeats late, or a
//! failed probe): an agent that accepts connections but does not serve also stops its heartbeats.
//! Probe connections are closed with a reset (linger 0): no FIN exchange, no TIME_WAIT.

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
    /// The agent's gRPC health service answered SERVING (a light probe: the port accepted).
    pub agent_healthy: bool,
    pub kubelet: Option<Reach>,
    /// The kubelet's `/healthz` (None: not probed).
    pub kubelet_healthz: Option<Result<(), String>>,
    /// The ICMP echo was answered (None: not probed).
    pub echo: Option<bool>,
    pub latency: Duration,
    /// A full probe (a suspect's), not a sweep's light one.
    pub full: bool,
}

impl ProbeResult {
    /// Whether the kubelet answered every kubelet probe (None: none configured).
    pub fn kubelet_up(&self) -> Option<bool> {
        if self.kubelet.is_none() && self.kubelet_healthz.is_none() {
            return None;
        }
        Some(self.kubelet.is_none_or(|k| k == Reach::Ok) && self.kubelet_healthz.as_ref().is_none_or(Result::is_ok))
    }

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
        match &self.kubelet_healthz {
            Some(Ok(())) => s.push_str(", kubelet healthz ok"),
            Some(Err(e)) => s.push_str(&format!(", kubelet healthz failed ({e})")),
            None => {}
        }
        if let Some(e) = self.echo {
            s.push_str(if e { ", ICMP echo answered" } else { ", ICMP echo unanswered" });
        }
        s.push_str(&format!(", {} ms", self.latency.as_millis()));
        s
    }
}

pub async fn connect(addr: SocketAddr, timeout: Duration) -> Reach {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_zero_linger();
            Reach::Ok
        }
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

/// ICMP echo over one unprivileged ping socket (`SOCK_DGRAM`, allowed by the
/// `net.ipv4.ping_group_range` sysctl) or, failing that, a raw socket (CAP_NET_RAW).
#[derive(Clone)]
pub struct Icmp {
    v4: Option<std::sync::Arc<surge_ping::Client>>,
    v6: Option<std::sync::Arc<surge_ping::Client>>,
}

impl Icmp {
    /// None when this process may open neither kind of ICMP socket.
    pub fn new() -> Option<Self> {
        // surge-ping tries the ping socket first, then a raw one.
        let client = |kind| {
            surge_ping::Client::new(&surge_ping::Config::builder().kind(kind).build()).map(std::sync::Arc::new).ok()
        };
        let icmp = Icmp { v4: client(surge_ping::ICMP::V4), v6: client(surge_ping::ICMP::V6) };
        (icmp.v4.is_some() || icmp.v6.is_some()).then_some(icmp)
    }

    async fn echo(&self, addr: IpAddr, timeout: Duration) -> Option<bool> {
        let client = if addr.is_ipv4() { self.v4.as_ref() } else { self.v6.as_ref() }?;
        let mut pinger = client.pinger(addr, surge_ping::PingIdentifier(rand::random())).await;
        pinger.timeout(timeout);
        // Only an echo reply is an answer: surge-ping also returns the "destination unreachable"
        // that a router (or this host) sends back about the request.
        let echoed = match pinger.ping(surge_ping::PingSequence(0), &[0; 16]).await {
            Ok((surge_ping::IcmpPacket::V4(p), _)) => p.get_icmp_type().0 == 0,
            Ok((surge_ping::IcmpPacket::V6(p), _)) => p.get_icmpv6_type().0 == 129,
            Err(_) => false,
        };
        Some(echoed)
    }
}

/// The kubelet's ports to probe on every node; 0: not probed.
#[derive(Debug, Clone, Copy)]
pub struct KubeletPorts {
    pub port: u16,
    pub healthz: u16,
}

/// Probes one node; `full`: with the agent's gRPC health check and the echo.
pub async fn probe(t: &Target, k: KubeletPorts, icmp: Option<&Icmp>, timeout: Duration, full: bool) -> ProbeResult {
    let start = Instant::now();
    let agent_addr = SocketAddr::new(t.addr, t.status_port);
    let kubelet =
        async { if k.port == 0 { None } else { Some(connect(SocketAddr::new(t.addr, k.port), timeout).await) } };
    let kubelet_healthz = async {
        if k.healthz == 0 {
            return None;
        }
        let url = format!("http://{}/healthz", SocketAddr::new(t.addr, k.healthz));
        Some(nodekeeper_common::http::get(&url, timeout).await)
    };
    let agent = async {
        let reach = connect(agent_addr, timeout).await;
        let healthy = reach == Reach::Ok && (!full || agent_health(agent_addr, timeout).await);
        (reach, healthy)
    };
    let echo = async {
        match icmp {
            Some(i) if full => i.echo(t.addr, timeout).await,
            _ => None,
        }
    };
    let ((agent, agent_healthy), kubelet, kubelet_healthz, echo) = tokio::join!(agent, kubelet, kubelet_healthz, echo);
    ProbeResult { agent, agent_healthy, kubelet, kubelet_healthz, echo, latency: start.elapsed(), full }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelet_is_up_only_when_every_configured_probe_says_so() {
        let r = |kubelet, kubelet_healthz| ProbeResult {
            agent: Reach::Ok,
            agent_healthy: true,
            kubelet,
            kubelet_healthz,
            echo: None,
            latency: Duration::ZERO,
            full: true,
        };
        assert_eq!(r(None, None).kubelet_up(), None);
        assert_eq!(r(Some(Reach::Ok), None).kubelet_up(), Some(true));
        assert_eq!(r(Some(Reach::Refused), None).kubelet_up(), Some(false));
        assert_eq!(r(Some(Reach::Ok), Some(Ok(()))).kubelet_up(), Some(true));
        let failed = r(Some(Reach::Ok), Some(Err("answered \"HTTP/1.1 500\"".into())));
        assert_eq!(failed.kubelet_up(), Some(false));
        assert!(failed.evidence().contains("kubelet healthz failed"), "{}", failed.evidence());
        assert_eq!(r(None, Some(Ok(()))).kubelet_up(), Some(true));
    }
}
