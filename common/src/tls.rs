//! Mutual TLS for every gRPC connection: TLS 1.3 only, client certificates required and verified
//! against the configured CA, identities taken from the certificate, never from message fields.
//!
//! An identity is a URI in the certificate's subject alternative names, SPIFFE-style:
//! `spiffe://nodekeeper/<kind>/<cluster>/<name>`, one URI per cluster the holder may act for
//! (`*` for every cluster). Any CA that can put a URI SAN in a certificate (cert-manager, Vault
//! PKI, `nodekeeper certs`) can issue them.
//!
//! The server re-reads its certificate, key and CA when the files change (checked at most once a
//! second, at the next handshake) or when `reload` is called (SIGHUP): new connections use the new
//! ones, open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// The trust domain in identity URIs.
pub const TRUST_DOMAIN: &str = "nodekeeper";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {message}")]
    Read { what: &'static str, path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where a service's certificate, key and CA bundle are.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This service's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This service's private key, PEM.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The conventional file names in a folder: `ca.pem`, `<name>.pem`, `<name>-key.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }

    fn mtimes(&self) -> [Option<SystemTime>; 3] {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        [m(&self.ca), m(&self.cert), m(&self.key)]
    }
}

/// What a certificate lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An agent: reports about its own node only.
    Node,
    /// A detector: reports reachability of nodes of its clusters.
    Detector,
    /// A subscriber (remediators, downstream systems): reads its clusters' events.
    Subscriber,
    /// An operator: freezes, resets breakers, sets desired state.
    Admin,
    /// A server (the event center).
    Server,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Detector => "detector",
            Kind::Subscriber => "subscriber",
            Kind::Admin => "admin",
            Kind::Server => "server",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "node" => Kind::Node,
            "detector" => Kind::Detector,
            "subscriber" => Kind::Subscriber,
            "admin" => Kind::Admin,
            "server" => Kind::Server,
            other => {
                return Err(format!(
                    "unknown identity kind {other:?}: expected node, detector, subscriber, admin or server"
                ));
            }
        })
    }
}

/// Who a peer is, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: Kind,
    pub name: String,
    /// Clusters it may act for; `*` means all.
    pub clusters: Vec<String>,
}

impl Identity {
    /// The URI SANs that encode this identity.
    pub fn uris(&self) -> Vec<String> {
        self.clusters
            .iter()
            .map(|c| format!("spiffe://{TRUST_DOMAIN}/{}/{c}/{}", self.kind.as_str(), self.name))
            .collect()
    }

    pub fn covers(&self, cluster: &str) -> bool {
        self.clusters.iter().any(|c| c == "*" || c == cluster)
    }

    /// Parses one identity URI.
    fn parse_uri(uri: &str) -> Option<(Kind, String, String)> {
        let rest = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?.strip_prefix('/')?;
        let mut parts = rest.splitn(3, '/');
        let kind = parts.next()?.parse().ok()?;
        let cluster = parts.next()?.to_owned();
        let name = parts.next()?.to_owned();
        if cluster.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some((kind, cluster, name))
    }

    /// The identity in a DER certificate: every nodekeeper URI SAN must agree on kind and name.
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subject alternative names: {e}"))?
            .ok_or("the certificate has no subject alternative names")?;
        let mut found: Option<Identity> = None;
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else { continue };
            let Some((kind, cluster, n)) = Self::parse_uri(uri) else { continue };
            match &mut found {
                None => found = Some(Identity { kind, name: n, clusters: vec![cluster] }),
                Some(id) if id.kind == kind && id.name == n => id.clusters.push(cluster),
                Some(_) => return Err("the certificate names more than one nodekeeper identity".into()),
            }
        }
        found.ok_or_else(|| format!("the certificate has no spiffe://{TRUST_DOMAIN}/ identity URI"))
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Read { what: "certificates", path: path.to_owned(), message };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "private key",
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Installs ring as the process's default rustls provider, for clients that take the default
/// (reqwest). Idempotent: an installed provider stays.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config: TLS 1.3, client certificate required and verified against `files.ca`, h2.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c).map_err(|e| TlsError::Config(format!("CA {}: {e}", files.ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| {
            TlsError::Config(format!("certificate {} and key {}: {e}", files.cert.display(), files.key.display()))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config as the clients' endpoints make it: trusting `files.ca`, presenting
/// `files.cert`, h2. For tools that talk TLS themselves (the CLI's diagnosis of a refused
/// connection).
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c).map_err(|e| TlsError::Config(format!("CA {}: {e}", files.ca.display())))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| {
            TlsError::Config(format!("certificate {} and key {}: {e}", files.cert.display(), files.key.display()))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config for an HTTPS health check: trusting the CAs in `ca` (a PEM bundle; a
/// self-signed server certificate may be its own), else the system's trust store; HTTP/1.1.
pub fn https_client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    external_client_config(ca, None, &[b"http/1.1"])
}

/// A client config for a server outside nodekeeper's own PKI (a database, an HTTPS endpoint):
/// its certificate and host name verified against the CAs in `ca` (a PEM bundle), else the
/// system's trust store; `client` (certificate, key) presented when the server asks for one.
pub fn external_client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| TlsError::Config(format!("CA {}: {e}", ca.display())))?;
            }
        }
        None => {
            // Certificates the system store holds that rustls cannot use are left out.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::Config(format!("certificate {} and key {}: {e}", cert.display(), key.display())))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The addresses in a `center` setting: one URL, or the center's replicas separated by commas
/// (`https://a:7443,https://b:7443`).
pub fn center_addresses(center: &str) -> Vec<&str> {
    center.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
}

/// Checks every address of a `center` setting: https with TLS files, or http only when
/// `insecure` (development). The message names the key.
pub fn check_center(center: &str, tls: bool, insecure: bool) -> Result<(), String> {
    let addresses = center_addresses(center);
    if addresses.is_empty() {
        return Err("center: expected the event center's address, e.g. \"https://center:7443\"".into());
    }
    for a in addresses {
        if a.starts_with("https://") {
            if !tls {
                return Err("tls: an https:// center needs tls.ca, tls.cert and tls.key".into());
            }
        } else if a.starts_with("http://") {
            if !insecure {
                return Err(format!(
                    "center: {a:?} is plaintext; use https:// with [tls], or set insecure = true (development only)"
                ));
            }
        } else {
            return Err(format!("center: expected https:// (or, insecure, http://) addresses, got {a:?}"));
        }
    }
    Ok(())
}

/// A lazily connecting channel to the center at `center` (see [`center_addresses`]), each
/// endpoint shaped by `tune`. With several replicas it holds one that answers and moves to the
/// next when that one stops answering (see [`follow_replicas`]); calls made while it has none
/// wait. Needs a tokio runtime.
pub fn center_channel(
    center: &str,
    tls: Option<&TlsFiles>,
    tune: impl Fn(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<tonic::transport::Channel, TlsError> {
    let mut endpoints =
        center_addresses(center).into_iter().map(|a| endpoint(a, tls).map(&tune)).collect::<Result<Vec<_>, _>>()?;
    match endpoints.len() {
        0 => Err(TlsError::Config(format!("no center address in {center:?}"))),
        1 => Ok(endpoints.remove(0).connect_lazy()),
        _ => {
            let (channel, changes) = tonic::transport::Channel::balance_channel(4);
            tokio::spawn(follow_replicas(endpoints, changes));
            Ok(channel)
        }
    }
}

/// How often the replica in use is checked.
const REPLICA_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `changes`' channel on one replica: the first that accepts a connection (from a random
/// start, to spread clients), checked every second, and the next that accepts one when it stops.
/// Balancing over all of them would not do: tonic sends calls to an endpoint it cannot reach and
/// fails them.
async fn follow_replicas(
    endpoints: Vec<tonic::transport::Endpoint>,
    changes: tokio::sync::mpsc::Sender<tonic::transport::channel::Change<usize, tonic::transport::Endpoint>>,
) {
    use tonic::transport::channel::Change;
    let n = endpoints.len();
    let mut current: Option<usize> = None;
    let mut start = rand::random::<u32>() as usize;
    loop {
        let answering = match current {
            Some(i) => endpoints[i].connect().await.is_ok(),
            None => false,
        };
        if !answering {
            for k in 0..n {
                let i = (start + k) % n;
                if Some(i) != current && endpoints[i].connect().await.is_ok() {
                    tracing::info!(center = %endpoints[i].uri(), "using this replica of the center");
                    if changes.send(Change::Insert(i, endpoints[i].clone())).await.is_err() {
                        return;
                    }
                    if let Some(old) = current.replace(i) {
                        tracing::warn!(center = %endpoints[old].uri(), "replica of the center not answering; moved on");
                        let _ = changes.send(Change::Remove(old)).await;
                    }
                    start = i + 1;
                    break;
                }
            }
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(REPLICA_CHECK).await;
    }
}

/// A client endpoint for `url`; with `tls`, mutual TLS trusting `tls.ca` and presenting
/// `tls.cert`. The files are read now, so an endpoint made for each connection picks up rotated
/// credentials.
pub fn endpoint(url: &str, tls: Option<&TlsFiles>) -> Result<tonic::transport::Endpoint, TlsError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| TlsError::Config(format!("invalid address {url:?}: {e}")))?;
    let Some(files) = tls else { return Ok(endpoint) };
    let read = |what: &'static str, p: &Path| {
        std::fs::read(p).map_err(|e| TlsError::Read { what, path: p.to_owned(), message: e.to_string() })
    };
    let config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("CA", &files.ca)?))
        .identity(tonic::transport::Identity::from_pem(
            read("certificate", &files.cert)?,
            read("private key", &files.key)?,
        ));
    endpoint.tls_config(config).map_err(|e| TlsError::Config(e.to_string()))
}

/// The server side, reloading its files when they change.
pub struct ServerTls {
    files: TlsFiles,
    state: Mutex<Loaded>,
}

struct Loaded {
    config: Arc<rustls::ServerConfig>,
    mtimes: [Option<SystemTime>; 3],
    checked: Instant,
}

impl ServerTls {
    pub fn new(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        let mtimes = files.mtimes();
        let config = server_config(&files)?;
        Ok(Arc::new(ServerTls { files, state: Mutex::new(Loaded { config, mtimes, checked: Instant::now() }) }))
    }

    /// The config for the next handshake, re-read if the files changed.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        let mut s = self.state.lock().expect("tls state lock");
        if s.checked.elapsed() >= Duration::from_secs(1) {
            s.checked = Instant::now();
            let now = self.files.mtimes();
            if now != s.mtimes {
                s.mtimes = now;
                self.load_into(&mut s);
            }
        }
        s.config.clone()
    }

    /// Re-reads the files now (SIGHUP).
    pub fn reload(&self) {
        let mut s = self.state.lock().expect("tls state lock");
        s.mtimes = self.files.mtimes();
        self.load_into(&mut s);
    }

    fn load_into(&self, s: &mut Loaded) {
        match server_config(&self.files) {
            Ok(c) => {
                s.config = c;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate, key and CA reloaded");
            }
            // A half-written file (cert updated before its key) must not take the server down:
            // keep serving with what worked and try again at the next change.
            Err(err) => {
                tracing::error!(error = %err, "TLS files changed but cannot be loaded; keeping the previous ones")
            }
        }
    }

    /// Accepted connections after their TLS handshake. Handshakes run in their own tasks, with a
    /// deadline, so a slow or hostile client cannot hold up the others.
    pub fn incoming(self: Arc<Self>, listener: TcpListener) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(128);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(err) => {
                            tracing::warn!(error = %err, "accept failed");
                            continue;
                        }
                    },
                };
                if let Err(err) = tcp.set_nodelay(true) {
                    tracing::warn!(error = %err, "cannot set TCP_NODELAY");
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            // The server stopped accepting: nothing to hand the connection to.
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(err)) => tracing::info!(peer = %peer, error = %err, "TLS handshake refused"),
                        Err(_) => tracing::info!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// The identity of the peer of a request on a TLS connection.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs =
        req.peer_certs().ok_or_else(|| tonic::Status::unauthenticated("no client certificate on this connection"))?;
    let leaf =
        certs.first().ok_or_else(|| tonic::Status::unauthenticated("no client certificate on this connection"))?;
    Identity::from_der(leaf.as_ref()).map_err(|e| tonic::Status::permission_denied(format!("client certificate: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_center_setting_names_one_address_or_several_each_checked() {
        assert_eq!(center_addresses(" https://a:1 , https://b:2,"), ["https://a:1", "https://b:2"]);
        assert!(check_center("https://a:1,https://b:2", true, false).is_ok());
        let plain = check_center("https://a:1, http://b:2", true, false).unwrap_err();
        assert!(plain.starts_with("center: \"http://b:2\" is plaintext"), "{plain}");
        assert!(check_center("http://a:1,http://b:2", false, true).is_ok());
        assert!(check_center("https://a:1", false, false).unwrap_err().starts_with("tls: an https:// center needs"));
        assert!(check_center("a:1", true, false).unwrap_err().contains("expected https://"));
        assert!(
            check_center(" , ", true, false).unwrap_err().starts_with("center: expected the event center's address")
        );
    }

    #[test]
    fn identity_uris_round_trip() {
        let id =
            Identity { kind: Kind::Subscriber, name: "remediator-a".into(), clusters: vec!["c1".into(), "c2".into()] };
        let uris = id.uris();
        assert_eq!(uris[0], "spiffe://nodekeeper/subscriber/c1/remediator-a");
        for u in &uris {
            let (k, _, n) = Identity::parse_uri(u).unwrap();
            assert_eq!((k, n.as_str()), (Kind::Subscriber, "remediator-a"));
        }
        assert!(id.covers("c2") && !id.covers("c3"));
        for bad in
            ["spiffe://other/node/c1/n", "spiffe://nodekeeper/root/c1/n", "spiffe://nodekeeper/node/c1/", "https://x"]
        {
            assert!(Identity::parse_uri(bad).is_none(), "{bad}");
        }
    }
}
