//! The smallest HTTP/1.1 health check: one GET, a 2xx status or an error that says what came
//! back. Health endpoints (kubelet's `/healthz`, a component's URL or socket) need no more, and a
//! full client would cost the agent more memory than everything else it runs.

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

/// GETs an `http://` URL and checks for a 2xx status within `timeout`.
pub async fn get(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("only http:// URLs are supported, got {url:?}"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let addr = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    tokio::time::timeout(timeout, async {
        let s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
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
}
