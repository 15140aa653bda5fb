//! Reaching the event center, and saying in words what went wrong when it cannot be reached or
//! refuses: the exit code follows the gRPC status, the text names the cause and what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

/// Exit codes, as documented in `--help`.
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_NOT_FOUND: u8 = 4;
pub const EXIT_CURSOR_EXPIRED: u8 = 5;
pub const EXIT_INVALID: u8 = 6;

/// The default event center address: where `nodekeeper dev` listens.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7443";

/// Where the CLI looks for its credentials by default.
pub fn default_certs_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into());
    home.join(".config/nodekeeper/pki")
}

/// `host:port` means TLS, as the center runs by default; a scheme given is kept.
pub fn server_url(server: &str) -> String {
    if server.contains("://") { server.to_owned() } else { format!("https://{server}") }
}

/// A gRPC status, shown once: its code in words and its message.
#[derive(Debug)]
pub struct StatusError(pub Status);

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let words = code_words(self.0.code());
        match self.0.message() {
            "" => f.write_str(&words),
            m => write!(f, "{words}: {m}"),
        }
    }
}

impl std::error::Error for StatusError {}

/// `NotFound` → "not found".
fn code_words(code: Code) -> String {
    let mut words = String::new();
    for c in format!("{code:?}").chars() {
        if c.is_ascii_uppercase() && !words.is_empty() {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    words
}

pub fn status(s: Status) -> anyhow::Error {
    anyhow::Error::new(StatusError(s))
}

/// Errors carry the gRPC status so that the exit code can say what went wrong.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Unreachable>().is_some() {
        return EXIT_UNREACHABLE;
    }
    match err.downcast_ref::<StatusError>() {
        Some(StatusError(s)) => match s.code() {
            Code::Unavailable => EXIT_UNREACHABLE,
            Code::NotFound => EXIT_NOT_FOUND,
            Code::FailedPrecondition if s.message().starts_with("cursor expired") => EXIT_CURSOR_EXPIRED,
            Code::InvalidArgument => EXIT_INVALID,
            _ => EXIT_ERROR,
        },
        None => EXIT_ERROR,
    }
}

/// The event center could not be reached, or no secure connection could be made with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

/// A connected channel to the center at `server` (see [`server_url`]; the replicas of a center
/// separated by commas: the first that answers); for https, with the identity's credentials in
/// `certs`.
pub async fn channel(server: &str, certs: Option<&Path>, identity: &str) -> anyhow::Result<Channel> {
    let mut failed = None;
    for one in nodekeeper_common::tls::center_addresses(server) {
        match channel_to(one, certs, identity).await {
            Ok(ch) => return Ok(ch),
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| anyhow::anyhow!("--server: expected the event center's address")))
}

async fn channel_to(server: &str, certs: Option<&Path>, identity: &str) -> anyhow::Result<Channel> {
    let url = server_url(server);
    let dir = certs.map(Path::to_path_buf).unwrap_or_else(default_certs_dir);
    let files = url.starts_with("https://").then(|| nodekeeper_common::tls::TlsFiles::in_dir(&dir, identity));
    let endpoint = nodekeeper_common::tls::endpoint(&url, files.as_ref())
        .map_err(|e| {
            let plain = url.replacen("https://", "http://", 1);
            anyhow::anyhow!(
                "{e}: a TLS connection needs ca.pem, {identity}.pem and {identity}-key.pem in --certs (`nodekeeper \
                 dev` puts its own in {}); for a center without TLS use --server {plain}",
                default_certs_dir().display()
            )
        })?
        .connect_timeout(Duration::from_secs(5));
    match endpoint.connect().await {
        Ok(ch) => Ok(ch),
        Err(e) => {
            let why = match tls_problem(&e) {
                Some(problem) => problem.explain(&url, &dir),
                None => format!("{} (is it running? see --server)", nodekeeper_common::errors::chain(&e)),
            };
            Err(Unreachable(format!("cannot reach the event center at {url}: {why}")).into())
        }
    }
}

/// A failed call's error in the operator's terms when the connection, not the call, failed: the
/// center refused our certificate after the handshake (TLS 1.3 says so at the first read), or a
/// plaintext client met a TLS server (its HTTP/2 reads the TLS alert as a broken frame).
pub async fn explain_failure(server: &str, certs: Option<&Path>, identity: &str, err: anyhow::Error) -> anyhow::Error {
    let url = server_url(server);
    let Some(StatusError(s)) = err.downcast_ref::<StatusError>() else { return err };
    if !matches!(s.code(), Code::Internal | Code::Unknown | Code::Unavailable | Code::Cancelled) {
        return err;
    }
    let dir = certs.map(Path::to_path_buf).unwrap_or_else(default_certs_dir);
    // The connection task saw the TLS alert; the call only sees the connection closed. Ask again.
    let problem = match std::error::Error::source(s).and_then(tls_problem) {
        Some(p) => Some(p),
        None => verdict_on_our_certificate(&url, &dir, identity).await,
    };
    if let Some(problem) = problem {
        return Unreachable(format!("cannot reach the event center at {url}: {}", problem.explain(&url, &dir))).into();
    }
    if let Some(addr) = url.strip_prefix("http://")
        && speaks_tls(addr.trim_end_matches('/')).await
    {
        let https = url.replacen("http://", "https://", 1);
        return Unreachable(format!(
            "the event center at {url} speaks TLS, not plaintext: use --server {https} (with the credentials in --certs)"
        ))
        .into();
    }
    err
}

/// Whether the server at `addr` answers an HTTP/2 preface with a TLS record (an alert).
async fn speaks_tls(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.ok()?;
        // TLS record types: 0x15 alert, 0x16 handshake.
        Some(matches!(first[0], 0x15 | 0x16))
    };
    tokio::time::timeout(Duration::from_secs(2), probe).await.ok().flatten().unwrap_or(false)
}

/// The TLS problem a fresh connection to an https `url` with the credentials in `dir` runs
/// into, including the server's refusal of our certificate, which TLS 1.3 sends after the
/// client's side of the handshake is done.
async fn verdict_on_our_certificate(url: &str, dir: &Path, identity: &str) -> Option<TlsProblem> {
    use tokio::io::AsyncReadExt;
    let addr = url.strip_prefix("https://")?.trim_end_matches('/');
    let host = addr.rsplit_once(':')?.0.trim_start_matches('[').trim_end_matches(']');
    let files = nodekeeper_common::tls::TlsFiles::in_dir(dir, identity);
    let config = nodekeeper_common::tls::client_config(&files).ok()?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut tls = match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return tls_problem(&e),
        };
        let mut first = [0u8; 1];
        match tls.read(&mut first).await {
            Err(e) => tls_problem(&e),
            Ok(_) => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(2), probe).await.ok().flatten()
}

/// What went wrong while making a TLS connection, in the terms the operator can act on.
#[derive(Debug, PartialEq)]
enum TlsProblem {
    /// The server's certificate does not chain to our CA.
    ServerNotFromOurCa,
    /// The server's certificate is not for the address we dialled, or has expired.
    ServerCertificate(String),
    /// The server refused our certificate.
    Refused(String),
    /// The server does not speak TLS.
    NotTls,
}

impl TlsProblem {
    fn explain(&self, url: &str, dir: &Path) -> String {
        let ca = dir.join("ca.pem");
        match self {
            TlsProblem::ServerNotFromOurCa => format!(
                "its certificate is not signed by the CA in {} (those credentials belong to another CA, e.g. an \
                 earlier `nodekeeper dev`); use --certs with the folder of the CA that signed the center's \
                 certificate (for `nodekeeper dev`: <data-dir>/pki)",
                ca.display()
            ),
            TlsProblem::ServerCertificate(why) => format!("its certificate is not acceptable: {why}"),
            TlsProblem::Refused(alert) => format!(
                "it refused the certificate in {} ({alert}): the center trusts another CA, or the certificate \
                 has expired; use --certs and --identity with credentials issued by the center's CA",
                dir.display()
            ),
            TlsProblem::NotTls => {
                let http = url.replacen("https://", "http://", 1);
                format!("it does not speak TLS (a center with insecure = true?): use --server {http}")
            }
        }
    }
}

/// The TLS error inside a connection error, if that is what it was.
fn tls_problem(err: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
    use rustls::{CertificateError, Error as Tls};
    let mut next = Some(err);
    while let Some(e) = next {
        // io::Error hides the error it wraps from `source()`; it is reached through `get_ref`.
        let inner = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|i| i as &dyn std::error::Error);
        if let Some(tls) = e.downcast_ref::<Tls>().or_else(|| inner.and_then(|i| i.downcast_ref::<Tls>())) {
            return Some(match tls {
                Tls::InvalidCertificate(
                    CertificateError::BadSignature | CertificateError::UnknownIssuer | CertificateError::BadEncoding,
                ) => TlsProblem::ServerNotFromOurCa,
                Tls::InvalidCertificate(other) => TlsProblem::ServerCertificate(format!("{other:?}")),
                Tls::AlertReceived(alert) => TlsProblem::Refused(format!("{alert:?}")),
                Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } => TlsProblem::NotTls,
                other => TlsProblem::ServerCertificate(other.to_string()),
            });
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_once_with_its_code_in_words() {
        let e = status(Status::not_found("no fault 99"));
        assert_eq!(format!("{e:#}"), "not found: no fault 99");
        assert_eq!(exit_code(&e), EXIT_NOT_FOUND);
        assert_eq!(format!("{:#}", status(Status::permission_denied(""))), "permission denied");
    }

    #[test]
    fn host_and_port_mean_tls() {
        assert_eq!(server_url("127.0.0.1:7443"), "https://127.0.0.1:7443");
        assert_eq!(server_url("http://h:1"), "http://h:1");
        assert_eq!(server_url("https://h:1"), "https://h:1");
    }

    #[test]
    fn a_tls_error_wrapped_in_io_is_found() {
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature));
        assert_eq!(tls_problem(&io), Some(TlsProblem::ServerNotFromOurCa));
        let plain = std::io::Error::other("connection refused");
        assert_eq!(tls_problem(&plain), None);
    }
}
