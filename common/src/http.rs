//! The smallest HTTP/1.1 health check: one GET, a 2xx status or an error that says what came
//! back. Health endpoints (kubelet's `/healthz`, a component's URL or socket) need no more, and a
//! full client would cost the agent more memory than everything else it runs.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends an HTTP/1.1 GET and checks for a 2xx status.
pub async fn request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
) -> Result<(), String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodekeeper\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if head.starts_with("HTTP/") && code.starts_with('2') {
        Ok(())
    } else {
        Err(format!("answered {:?}", head.lines().next().unwrap_or("nothing")))
    }
}

/// GETs an `http://` or `https://` URL (trusting the system's CAs) and checks for a 2xx status
/// within `timeout`.
pub async fn get(url: &str, timeout: Duration) -> Result<(), String> {
    get_trusting(url, None, timeout).await
}

/// [`get`], trusting the CAs in `ca` (a PEM file) for an `https://` URL.
pub async fn get_trusting(url: &str, ca: Option<&Path>, timeout: Duration) -> Result<(), String> {
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(format!("only http:// and https:// URLs are supported, got {url:?}")),
    };
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => authority,
    };
    let addr = if host == authority { format!("{authority}:{}", if tls { 443 } else { 80 }) } else { authority.into() };
    tokio::time::timeout(timeout, async {
        let s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
        if !tls {
            return request(s, authority, &path).await;
        }
        let config = crate::tls::https_client_config(ca).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| format!("{host:?} is not a server name: {e}"))?;
        let s = tokio_rustls::TlsConnector::from(config).connect(name, s).await.map_err(|e| format!("TLS: {e}"))?;
        request(s, authority, &path).await
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_checks_against_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/healthz");
        assert_eq!(get(&url, Duration::from_secs(2)).await, Ok(()));
        assert!(get(&url, Duration::from_secs(2)).await.unwrap_err().contains("500"));
    }

    #[tokio::test]
    async fn https_checks_trust_the_given_ca_or_the_systems() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("server.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let Ok(mut s) = acceptor.accept(s).await else { continue };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                let _ = s.shutdown().await;
            }
        });
        let url = format!("https://localhost:{port}/healthz");
        assert_eq!(get_trusting(&url, Some(&ca), Duration::from_secs(5)).await, Ok(()));
        // The system's store does not know this self-signed certificate.
        let e = get(&url, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("TLS") && e.contains("UnknownIssuer"), "{e}");
        assert!(get("ftp://localhost/", Duration::from_secs(1)).await.unwrap_err().contains("http:// and https://"));
    }
}
